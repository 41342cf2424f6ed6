"""Word-level tokenizer over ShapesWorld's vocabulary plus the special tokens of the chat layout.

Words come from every prompt of the grammar, every implicit prompt and the critique templates
(models/tasks.py), so the vocabulary is closed and fixed; anything else maps to <unk>.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import List, Sequence

SPECIALS = ("<pad>", "<bos>", "<eos>", "<user>", "<assistant>", "<think>", "</think>", "<img>", "</img>", "<unk>")
_WORD = re.compile(r"[a-z]+|[,.:]")


@lru_cache(maxsize=1)
def vocabulary() -> List[str]:
    from ..shapes.grammar import CATEGORIES, all_prompts
    from ..shapes.implicit import all_implicit
    from .tasks import TEMPLATE_WORDS

    words = set(TEMPLATE_WORDS.split())
    for c in CATEGORIES:
        for p in all_prompts(c):
            words.update(_WORD.findall(p))
    for p in all_implicit():
        words.update(_WORD.findall(p))
    return list(SPECIALS) + sorted(words)


class Tokenizer:
    def __init__(self):
        self.vocab = vocabulary()
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = self.index["<pad>"], self.index["<bos>"], self.index["<eos>"]
        self.think_id, self.think_end_id = self.index["<think>"], self.index["</think>"]
        self.img_id, self.img_end_id = self.index["<img>"], self.index["</img>"]
        self.user_id, self.assistant_id, self.unk_id = (
            self.index["<user>"],
            self.index["<assistant>"],
            self.index["<unk>"],
        )

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> List[int]:
        return [self.index.get(w, self.unk_id) for w in _WORD.findall(text.lower())]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        words = [self.vocab[i] for i in ids if not (skip_special and self.vocab[i] in SPECIALS)]
        return re.sub(r" ([,.:])", r"\1", " ".join(words))
