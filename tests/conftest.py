import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# the tiny BAGEL fixtures (tiny_bagel_dir, tiny_bagel) for every test module that asks for them
pytest_plugins = ["bagel_fixtures"]


@pytest.fixture
def poison():
    """Every torch.empty* (ours included, from C++) is filled with NaN while the test runs, so an
    output element a kernel forgets to write fails the comparison instead of passing by luck."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(prev_det)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
