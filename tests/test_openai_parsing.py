"""Parsing of OpenAI-compatible decomposer and verifier outputs, against hand-computed values."""

import math

import pytest

from alphagrpo_serve.reward.openai_parsing import (
    DECOMPOSITION_SCHEMA,
    parse_answer,
    score_answer,
    validate_decomposition,
    yes_no_score,
)


def lp(p):
    return math.log(p)


def test_score_sums_case_and_space_variants():
    top = [
        {"token": "Yes", "logprob": lp(0.3)},
        {"token": " yes", "logprob": lp(0.2)},
        {"token": "No", "logprob": lp(0.1)},
        {"token": " NO", "logprob": lp(0.15)},
        {"token": "Maybe", "logprob": lp(0.2)},
    ]
    assert yes_no_score(top) == pytest.approx(0.5 / 0.75, abs=1e-12)
    assert yes_no_score([{"token": "The", "logprob": lp(0.9)}]) is None


def test_fallback_to_parsed_answer_is_reported():
    assert score_answer([{"token": "The", "logprob": -0.1}], "Yes, there is.") == (1.0, "fallback: parsed answer")
    assert score_answer([], "no.")[0] == 0.0
    score, how = score_answer([], "unclear")
    assert score is None and "neither yes nor no" in how
    assert parse_answer("  YES") == 1.0 and parse_answer("nothing") is None


def test_decomposition_validation():
    good = {
        "semantic": [
            {"question": "Is there a red circle?", "tag": "Existence"},
            {"question": "Are there exactly three cats?", "tag": "Count"},
        ],
        "quality": [{"question": "Are the shapes well formed?", "aspect": "Geometry"}],
    }
    qs = validate_decomposition(good)
    assert [(q.id, q.kind, q.tag) for q in qs] == [
        ("q0", "semantic", "Existence"),
        ("q1", "semantic", "Count"),
        ("q2", "quality", "Geometry"),
    ]
    for bad, words in [
        ({"semantic": []}, "exactly 'semantic' and 'quality'"),
        ({"semantic": [{"question": "A red circle.", "tag": "Existence"}], "quality": []}, "not a yes/no question"),
        ({"semantic": [{"question": "Is it red?", "tag": "Colour"}], "quality": []}, "tag must be one of"),
        ({"semantic": [], "quality": [{"question": "Is it sharp?", "aspect": "Texture"}]}, "no semantic question"),
        ({"semantic": [{"question": "Is it red?"}], "quality": []}, "exactly 'question' and 'tag'"),
    ]:
        with pytest.raises(ValueError) as info:
            validate_decomposition(bad)
        assert words in str(info.value)
    assert DECOMPOSITION_SCHEMA["properties"]["semantic"]["items"]["properties"]["tag"]["enum"][0] == "Style"
