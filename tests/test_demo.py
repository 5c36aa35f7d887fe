"""The README's demo: trains on the bundled digits and must reach 95% test accuracy."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import train_digits  # noqa: E402


def test_demo_reaches_95_percent_quickly(capsys):
    start = time.perf_counter()
    assert train_digits.main([]) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    final = [line for line in out.splitlines() if line.startswith("final test accuracy")]
    assert final and float(final[0].split()[3]) >= 0.95
    assert elapsed < 120, f"demo took {elapsed:.0f}s; the README promises under 2 minutes"


def test_demo_conv_pcdeq2_trains(capsys):
    assert train_digits.main(["--model", "conv", "--activation", "sigmoid", "--epochs", "15", "--target", "0.9"]) == 0


def test_demo_paper_multi_conv_network_trains_on_upsampled_digits(capsys):
    # the paper's MNIST multi-conv network (12, 24, 48 channels) on the digits upsampled to 28x28
    assert train_digits.main(["--model", "paper-multi-conv", "--epochs", "3", "--target", "0.85"]) == 0
    assert "of (1, 28, 28)" in capsys.readouterr().out
