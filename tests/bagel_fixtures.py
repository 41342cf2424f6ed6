"""Fixtures for the BAGEL tests: a tiny random BAGEL in the official layout, built in a temp dir by
tools/make_tiny_bagel.py (seconds, no network), and loaded once per session.

conftest.py registers this module as a plugin, so any test can take `tiny_bagel_dir` or `tiny_bagel`
as an argument."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import make_tiny_bagel  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bagel_dir(tmp_path_factory) -> str:
    return make_tiny_bagel.write(str(tmp_path_factory.mktemp("tiny_bagel")), seed=0)


@pytest.fixture(scope="session")
def tiny_bagel(tiny_bagel_dir):
    from alphagrpo_serve.models.bagel import load_bagel

    return load_bagel(tiny_bagel_dir)
