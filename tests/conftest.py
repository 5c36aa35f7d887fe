"""Shared test fixtures. TRITON_INTERPRET must be set before any Triton kernel is defined, so it is
set here, first (DESIGN.md section 5): on machines without a GPU the Triton backend runs on CPU tensors
(importing torch defines no Triton kernel, so checking for a GPU first is safe)."""

import os

import torch

if not torch.cuda.is_available():  # on a GPU machine the real kernels are tested
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402


# CI replays the same examples every run (a red CI must be reproducible);
# HYPOTHESIS_PROFILE=explore draws fresh ones.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def pytest_terminal_summary(terminalreporter):
    """The skipped tests, grouped by their reason, one line each (what this machine cannot run, and why)."""
    from collections import Counter

    skipped = terminalreporter.stats.get("skipped", [])
    reasons = Counter(
        str(report.longrepr[2]).removeprefix("Skipped: ") if isinstance(report.longrepr, tuple) else "(no reason given)"
        for report in skipped
    )
    if reasons:
        terminalreporter.section(f"{len(skipped)} skipped, by reason")
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:5d}  {reason}")
