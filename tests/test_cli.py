"""The `alphagrpo` command, run in-process."""

import json

import numpy as np
import pytest
from PIL import Image

from alphagrpo_serve.cli import main
from alphagrpo_serve.shapes.world import Obj, Scene, render


def test_eval_shapes_ground_truth(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "shapes", "--ground-truth", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| position | 50 | 1.000 |" in text and "**1.000**" in text
    assert json.loads(out.read_text())["overall"] == 1.0


def test_eval_shapes_pairs_and_reward(capsys, tmp_path):
    good = render(Scene([Obj("circle", "red", 8, 16, 5), Obj("square", "blue", 24, 16, 5)]))
    Image.fromarray(good).save(tmp_path / "a.png")
    Image.fromarray(good).save(tmp_path / "b.png")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"prompt": "a red circle to the left of a blue square", "image": "a.png"})
        + "\n"
        + json.dumps({"prompt": "a red circle to the right of a blue square", "image": "b.png"})
        + "\n"
    )
    assert main(["eval", "shapes", "--pairs", str(tmp_path / "pairs.jsonl")]) == 0
    assert "| position | 2 | 0.500 |" in capsys.readouterr().out
    assert main(["reward", "--prompt", "a red circle", "--image", str(tmp_path / "a.png")]) == 0
    assert "Is there a red circle in the image?" in capsys.readouterr().out


def test_cli_errors_are_clear(tmp_path):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="at word 2"):
        main(["reward", "--prompt", "a red blob", "--image", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["reward", "--prompt", "a red circle", "--image", str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match="exactly one of"):
        main(["eval", "shapes"])
