"""BAGEL's tokenizer (Qwen2 with its special tokens) and the ids the core needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

BOS, EOS = "<|im_start|>", "<|im_end|>"
START_OF_IMAGE, END_OF_IMAGE = "<|vision_start|>", "<|vision_end|>"
SPECIAL_TOKENS = (BOS, EOS, START_OF_IMAGE, END_OF_IMAGE)


@dataclass(frozen=True)
class BagelTokens:
    """Official new_token_ids: bos <|im_start|>, eos <|im_end|>, start/end of image."""

    bos: int
    eos: int
    start_of_image: int
    end_of_image: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "BagelTokens":
        vocab = tokenizer.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks BAGEL's special tokens {missing}")
        return cls(*(vocab[t] for t in SPECIAL_TOKENS))

    def ids(self) -> List[int]:
        return [self.bos, self.eos, self.start_of_image, self.end_of_image]

    def wrap(self, ids: Sequence[int]) -> List[int]:
        """[bos] + ids + [eos]: how the official prepare_prompts adds a text to the context."""
        return [self.bos, *ids, self.eos]


def load_tokenizer(path: str):
    """The folder's tokenizer (local files only)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # it probes config.json (model_type bagel, unknown to transformers)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        logging.set_verbosity(level)
