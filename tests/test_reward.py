"""Embedded DVReward: aggregation by hand, ordering of near misses, blank images, cache, bad input."""

import math

import numpy as np
import pytest

from alphagrpo_serve.reward import Answer, DVReward, Question, ShapesDecomposer, aggregate, embedded_reward
from alphagrpo_serve.shapes.grammar import PromptError
from alphagrpo_serve.shapes.world import Obj, Scene, blank, render


def _ans(kind, score):
    tag = "Existence" if kind == "semantic" else "Geometry"
    return Answer(Question("q", "?", kind, tag), score)


def test_aggregation_by_hand():
    answers = [_ans("semantic", 1.0), _ans("semantic", 0.5), _ans("quality", 0.8), _ans("quality", None)]
    reward, S, Q, failed = aggregate(answers)
    assert S == 0.75 and Q == 0.8 and failed == 1
    assert reward == pytest.approx(math.sqrt(0.75 * 0.8), abs=1e-15)
    assert aggregate(answers, "mean")[0] == pytest.approx(0.775)
    assert aggregate(answers, "weighted", semantic_weight=0.25)[0] == pytest.approx(0.25 * 0.75 + 0.75 * 0.8)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(answers, "max")


def test_question_kinds_and_tags_validated():
    with pytest.raises(ValueError, match="tag must be one of"):
        Question("q", "?", "semantic", "Geometry")
    with pytest.raises(ValueError, match="kind must be one of"):
        Question("q", "?", "style", "Existence")


def test_decomposition_by_hand():
    qs = ShapesDecomposer().decompose(["three green triangles"])[0]
    assert [(q.kind, q.tag, q.text) for q in qs] == [
        ("semantic", "Existence", "Is there a green triangle in the image?"),
        ("semantic", "Count", "Are there exactly three green triangles?"),
        ("semantic", "Attribute", "Is the triangle green?"),
        ("quality", "Geometry", "Are all the shapes well formed (clean circles, squares and triangles)?"),
        ("quality", "Texture", "Is the background clean, free of specks and smudges?"),
        ("quality", "Coherence", "Does the image hold only the objects the prompt asks for?"),
    ]
    qs = ShapesDecomposer().decompose(["a red circle above a blue square"])[0]
    assert [q.tag for q in qs if q.kind == "semantic"] == [
        "Existence",
        "Attribute",
        "Existence",
        "Attribute",
        "Spatial",
    ]
    assert qs[4].text == "Is the red circle above the blue square?"


CASES = {
    "a red circle to the left of a blue square": {
        "correct": [Obj("circle", "red", 8, 16, 5), Obj("square", "blue", 24, 16, 5)],
        "wrong colour": [Obj("circle", "green", 8, 16, 5), Obj("square", "blue", 24, 16, 5)],
        "wrong side": [Obj("circle", "red", 24, 16, 5), Obj("square", "blue", 8, 16, 5)],
        "missing object": [Obj("circle", "red", 8, 16, 5)],
        "extra object": [
            Obj("circle", "red", 8, 16, 5),
            Obj("square", "blue", 24, 16, 5),
            Obj("triangle", "yellow", 16, 5, 4),
        ],
    },
    "three green triangles": {
        "correct": [
            Obj("triangle", "green", 7, 8, 4),
            Obj("triangle", "green", 24, 8, 4),
            Obj("triangle", "green", 16, 24, 4),
        ],
        "wrong count": [Obj("triangle", "green", 7, 8, 4), Obj("triangle", "green", 24, 8, 4)],
        "wrong colour": [
            Obj("triangle", "orange", 7, 8, 4),
            Obj("triangle", "green", 24, 8, 4),
            Obj("triangle", "green", 16, 24, 4),
        ],
        "extra object": [
            Obj("triangle", "green", 7, 8, 4),
            Obj("triangle", "green", 24, 8, 4),
            Obj("triangle", "green", 16, 24, 4),
            Obj("circle", "red", 26, 25, 4),
        ],
    },
    "a yellow square": {
        "correct": [Obj("square", "yellow", 16, 16, 5)],
        "wrong colour": [Obj("square", "orange", 16, 16, 5)],
        "missing object": [],
        "extra object": [Obj("square", "yellow", 10, 16, 5), Obj("circle", "blue", 25, 16, 4)],
    },
}


@pytest.mark.parametrize("prompt", list(CASES))
def test_correct_image_scores_above_every_near_miss(prompt):
    names = list(CASES[prompt])
    results = embedded_reward()([prompt] * len(names), [render(Scene(CASES[prompt][n])) for n in names])
    rewards = dict(zip(names, (r.reward for r in results)))
    for name, value in rewards.items():
        if name != "correct":
            assert rewards["correct"] > value + 0.05, (prompt, rewards)
    assert rewards["correct"] > 0.9, rewards


def test_count_near_miss_is_graded():
    r = embedded_reward()
    prompt = "four blue circles"
    pos = [(7, 7), (24, 7), (7, 24), (24, 24)]
    imgs = [render(Scene([Obj("circle", "blue", x, y, 4) for x, y in pos[:k]])) for k in (4, 3, 2)]
    count_scores = [next(a.score for a in res.answers if a.question.tag == "Count") for res in r([prompt] * 3, imgs)]
    assert count_scores[0] > 0.95
    assert count_scores[1] == pytest.approx(math.exp(-1), abs=0.05)  # off by one
    assert count_scores[2] == pytest.approx(math.exp(-2), abs=0.05)  # off by two


def test_blank_image_scores_zero_with_breakdown():
    res = embedded_reward()(["three green triangles", "a red circle and a blue square"], [blank(), blank()])
    for r in res:
        assert r.reward == 0.0 and r.semantic == 0.0
        assert len(r.answers) >= 5 and all(a.score is not None for a in r.answers)
        assert "reward = 0.000" in r.table()


def test_implicit_prompt_is_judged_by_its_meaning():
    r = embedded_reward()
    img_blue = render(Scene([Obj("circle", "blue", 16, 16, 5)]))
    img_red = render(Scene([Obj("circle", "red", 16, 16, 5)]))
    p = "a shape with no corners, coloured like the sky"
    good, bad = r([p, p], [img_blue, img_red])
    assert good.reward > 0.9 > bad.reward + 0.3


def test_decompositions_are_cached():
    calls = []

    class Counting(ShapesDecomposer):
        def decompose(self, prompts):
            calls.append(list(prompts))
            return super().decompose(prompts)

    from alphagrpo_serve.reward import DetectorVerifier

    r = DVReward(Counting(), DetectorVerifier())
    img = render(Scene([Obj("square", "yellow", 16, 16, 5)]))
    r(["a yellow square", "a yellow square", "a square"], [img] * 3)
    r(["a yellow square"], [img])
    assert calls == [["a square", "a yellow square"]]
    assert r.cache.hits >= 1 and len(r.cache) == 2


def test_bad_input():
    r = embedded_reward()
    with pytest.raises(PromptError, match=r"at word 2 \('blob'\)"):
        r(["a red blob"], [blank()])
    with pytest.raises(ValueError, match="must be square"):
        r(["a red circle"], [np.zeros((32, 16, 3), np.uint8)])
    with pytest.raises(ValueError, match="got 2 prompts but 1 images"):
        r(["a red circle", "a square"], [blank()])
