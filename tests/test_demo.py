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


def test_install_self_check_passes_here_and_catches_a_wrong_backend(capsys, monkeypatch):
    """python -m pcdeq_kernels: every usable backend against the float64 reference; exit 1 on a wrong answer."""
    import pcdeq_kernels as pk
    from pcdeq_kernels import __main__ as self_check

    assert self_check.main([]) == 0
    out = capsys.readouterr().out
    for name, status in pk.backend_status().items():
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert ("available; ok:" in line) if status.available else ("unavailable:" in line and status.reason in line)
    solve = self_check.fixed_point

    def off_by_a_little(u, w, *args, backend, **kwargs):  # the cpu backend's answer, 1e-3 off
        z, stats = solve(u, w, *args, backend=backend, **kwargs)
        return (z * 1.001 if backend == "cpu" else z), stats

    monkeypatch.setattr(self_check, "fixed_point", off_by_a_little)
    assert self_check.main([]) == (1 if pk.available_backends()["cpu"] else 0)
    assert "cpu       available; WRONG" in capsys.readouterr().out or not pk.available_backends()["cpu"]
