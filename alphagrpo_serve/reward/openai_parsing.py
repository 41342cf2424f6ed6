"""Pure parsing for the OpenAI-compatible DVReward backends (issue 6 groundwork): the decomposer's
JSON schema and its validation, and the verifier's yes/no score from first-token log-probs.

Score = P(yes) / (P(yes) + P(no)), summing the case and leading-space variants of "yes" and "no"
among the first generated token's top log-probs; when neither appears, the parsed answer (1 or 0)
is used and reported as a fallback.
"""

from __future__ import annotations

import math
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .types import QUALITY_TAGS, SEMANTIC_TAGS, Question

YES = {"yes"}
NO = {"no"}
_QUESTION = re.compile(r"^(is|are|does|do|did|can|could|has|have|was|were|will|would|should)\b.*\?$", re.I)

# The form a question must have (validate_decomposition checks it; the schema asks the server's
# structured-output engine to enforce it while decoding).
QUESTION_PATTERN = r"^(Is|Are|Does|Do|Can|Has|Have) [A-Za-z0-9 ,'-]{1,120}\?$"  # xgrammar compiles bounded classes only
MAX_SEMANTIC, MAX_QUALITY = 12, 6

DECOMPOSITION_SCHEMA = {
    "type": "object",
    "properties": {
        "semantic": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_SEMANTIC,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "pattern": QUESTION_PATTERN},
                    "tag": {"type": "string", "enum": list(SEMANTIC_TAGS)},
                },
                "required": ["question", "tag"],
                "additionalProperties": False,
            },
        },
        "quality": {
            "type": "array",
            "maxItems": MAX_QUALITY,
            "items": {
                "type": "object",
                "properties": {
                    "question": {"type": "string", "pattern": QUESTION_PATTERN},
                    "aspect": {"type": "string", "enum": list(QUALITY_TAGS)},
                },
                "required": ["question", "aspect"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["semantic", "quality"],
    "additionalProperties": False,
}


def _norm(token: str) -> str:
    return token.strip().lower()


def yes_no_score(top_logprobs: Sequence[Dict]) -> Optional[float]:
    """P(yes) / (P(yes) + P(no)) from [{"token": ..., "logprob": ...}, ...]; None when neither appears."""
    p_yes = sum(math.exp(t["logprob"]) for t in top_logprobs if _norm(t["token"]) in YES)
    p_no = sum(math.exp(t["logprob"]) for t in top_logprobs if _norm(t["token"]) in NO)
    if p_yes + p_no <= 0.0:
        return None
    return p_yes / (p_yes + p_no)


def parse_answer(text: str) -> Optional[float]:
    """1.0 for an answer that starts with yes, 0.0 for no, None otherwise."""
    m = re.match(r"^\W*(yes|no)\b", text.strip(), re.I)
    if not m:
        return None
    return 1.0 if m.group(1).lower() == "yes" else 0.0


def score_answer(top_logprobs: Sequence[Dict], text: str) -> Tuple[Optional[float], str]:
    """(score, how): from the log-probs when yes/no is among them, else the parsed text ('fallback')."""
    s = yes_no_score(top_logprobs)
    if s is not None:
        return s, "logprobs"
    parsed = parse_answer(text)
    if parsed is not None:
        return parsed, "fallback: parsed answer"
    return None, f"neither yes nor no in the top log-probs or the answer {text[:40]!r}"


def validate_decomposition(obj) -> List[Question]:
    """Questions from a decomposer's JSON object; ValueError naming what is wrong."""
    if not isinstance(obj, dict) or set(obj) != {"semantic", "quality"}:
        raise ValueError(
            f"expected an object with exactly 'semantic' and 'quality', got {type(obj).__name__} "
            f"{sorted(obj) if isinstance(obj, dict) else ''}"
        )
    out: List[Question] = []
    for kind, key in (("semantic", "tag"), ("quality", "aspect")):
        items = obj[kind]
        if not isinstance(items, list):
            raise ValueError(f"'{kind}' must be a list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"question", key}:
                raise ValueError(f"{kind}[{i}] must have exactly 'question' and '{key}'")
            text = str(item["question"]).strip()
            if not _QUESTION.match(text):
                raise ValueError(f"{kind}[{i}] is not a yes/no question: {text!r}")
            out.append(Question(f"q{len(out)}", text, kind, str(item[key])))  # Question checks the tag
    if not any(q.kind == "semantic" for q in out):
        raise ValueError("no semantic question")
    return out
