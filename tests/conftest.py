"""Shared test fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined, so it is
set here, first (DESIGN.md section 5): on machines without a GPU the Triton backend runs on CPU tensors."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402


# CI replays the same examples every run (a red CI must be reproducible);
# HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
