"""The benchmark report command on a tiny grid: table, JSON with versions, plots, agreement check.
On CPU tensors (``--device cpu``) also on a GPU machine, where the command defaults to cuda."""

import json
import os

import pytest
import torch

import pcdeq_kernels as pk
from pcdeq_kernels.bench import paths
from pcdeq_kernels.bench.__main__ import main


def test_report_writes_table_json_and_plots(tmp_path, capsys):
    assert main(["--device", "cpu", "--shapes", "16x12,5x33", "--min-seconds", "0.01", "--out", str(tmp_path), "--no-progress",
                 "--paths", "official,reference"]) == 0
    out = capsys.readouterr().out
    assert "official" in out and "reference" in out and "vs official" in out
    (json_file,) = tmp_path.glob("*.json")
    result = json.loads(json_file.read_text())
    assert result["machine"]["torch"] and "triton" in result["machine"] and result["command"].startswith("python -m")
    rows = result["results"]
    assert {tuple(r["shape"]) for r in rows} == {(16, 12), (5, 33)}
    assert {r["mode"] for r in rows} == {"forward", "train"}
    assert all(r["median_ms"] > 0 and r["forward_iterations"] > 1 for r in rows)
    assert all(r["speedup_vs_official"] == 1.0 for r in rows if r["path"] == "official")
    conv = result["convergence"]
    assert all(e <= b + 1e-12 for e, b in zip(conv["forward_error"], conv["bound"]))  # c^k, proven
    assert 0 < conv["contraction_bound"] <= conv["global_rate"] * (1 + 1e-9)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2


def test_paths_agree_and_missing_peers_say_why():
    u, w = paths.make_problem(8, 10)
    z_ref = paths.runner("official", u, w).forward()
    for name, why in paths.available_paths("cpu").items():
        if why:
            assert len(why) > 10  # a reason a user can act on
            continue
        if name == "triton":
            continue
        z = paths.runner(name, u, w).forward()
        assert ((z - z_ref).norm() / z_ref.norm()).item() < 1e-3


def test_bad_shapes_argument():
    with pytest.raises(SystemExit):
        main(["--shapes", "64by80"])


def test_conv_grid_times_the_cpu_backend_on_conv_problems(tmp_path, capsys):
    assert main(["--device", "cpu", "--shapes", "3x4x5x6", "--min-seconds", "0.01", "--out", str(tmp_path), "--no-progress",
                 "--paths", "official,reference,cpu", "--modes", "forward"]) == 0
    (json_file,) = tmp_path.glob("*conv*.json")
    rows = json.loads(json_file.read_text())["results"]
    assert {r["path"] for r in rows} == {"official", "reference", "cpu"} and rows[0]["shape"] == [3, 4, 5, 6]
    # flops per iteration: 2 B C H W (9 C)
    assert all(r["flops"] == pytest.approx(2 * 3 * 4 * 5 * 6 * 36 * r["forward_iterations"]) for r in rows)
    # the convergence illustration is a dense problem: not part of a conv-only report
    assert json.loads(json_file.read_text())["convergence"] is None and len(list(tmp_path.glob("*.png"))) == 1
    with pytest.raises(SystemExit):
        main(["--shapes", "3x4x5"])


def test_unknown_paths_and_modes_are_errors(tmp_path):
    with pytest.raises(ValueError, match="official"):
        main(["--device", "cpu", "--shapes", "4x6", "--paths", "official,refrence", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(ValueError, match="official"):  # speedups need the official loop
        main(["--device", "cpu", "--shapes", "4x6", "--paths", "reference", "--out", str(tmp_path), "--no-progress"])
    with pytest.raises(SystemExit):
        main(["--shapes", "4x6", "--modes", "forward,backward"])


def test_forced_loops_are_opt_in_and_set_the_backends_path_variable(monkeypatch):
    """triton-stepwise etc. run only when named, and force the loop for the backward solve too."""
    assert set(paths.FORCED_LOOPS) == {"cuda-single", "cuda-stepwise", "triton-single", "triton-stepwise", "triton-split"}
    seen = []
    from pcdeq_kernels import functional

    real = functional.fixed_point

    def spy(*args, **kwargs):
        seen.append(("forward", kwargs["backend"], os.environ.get("PCDEQ_TRITON_PATH")))
        return real(*args, **{**kwargs, "backend": "reference"})

    monkeypatch.setattr(paths, "fixed_point", spy)
    monkeypatch.delenv("PCDEQ_TRITON_PATH", raising=False)
    u, w = paths.make_problem(4, 6)
    runner = paths.runner("triton-stepwise", u, w)
    runner.forward()
    assert seen == [("forward", "triton", "stepwise")] and "PCDEQ_TRITON_PATH" not in os.environ
    from pcdeq_kernels import reference

    solves = []
    real_adjoint = reference.adjoint_solve

    def adjoint_spy(*args, **kwargs):
        solves.append(os.environ.get("PCDEQ_TRITON_PATH"))
        return real_adjoint(*args, **kwargs)

    monkeypatch.setattr(reference, "adjoint_solve", adjoint_spy)
    runner.train_step()
    assert solves == ["stepwise"] and "PCDEQ_TRITON_PATH" not in os.environ


def test_paths_say_why_they_cannot_run_a_dtype_or_kind(monkeypatch):
    """torchdeq's Anderson solver has no half-precision kernels (torch.linalg.solve); the Triton split
    loop is dense only. Checked as a GPU machine would see them: every backend there."""
    import types

    gpu_backend = types.SimpleNamespace(unsupported_reason=lambda spec, problem: "", unavailable_reason=lambda: "")
    monkeypatch.setattr(paths.backends, "available_backends", lambda: {"reference": True, "cuda": True, "triton": True})
    monkeypatch.setattr(paths.backends, "get", lambda name: gpu_backend)
    monkeypatch.setattr(paths, "torchdeq_missing_reason", lambda: "")
    dense32 = paths.available_paths("cuda", "dense")
    assert all(why == "" for why in dense32.values()) and "triton-split" in dense32
    assert "torch.linalg.solve" in paths.available_paths("cuda", "dense", torch.bfloat16)["torchdeq-anderson"]
    assert paths.available_paths("cuda", "dense", torch.bfloat16)["torchdeq-fpi"] == ""
    conv = paths.available_paths("cuda", "conv")
    assert conv["triton-split"] == "dense problems only" and conv["triton-stepwise"] == ""


def test_gpu_peak_follows_torchs_precision_for_the_grids_op():
    """float32 peaks: matmuls exact by default (FP32 peak), convolutions TF32 by default (tf32 peak);
    a grid mixing the two at different precisions has no single peak."""
    from pcdeq_kernels.bench.report import peak_tflops

    from problems import cudnn_allow_tf32, float32_matmul_precision

    gpu = "NVIDIA H100 80GB HBM3"
    with float32_matmul_precision("highest"), cudnn_allow_tf32(True):
        assert peak_tflops(gpu, torch.float32, ["dense"])[0] == 66.9
        assert peak_tflops(gpu, torch.float32, ["conv"])[0] == 494.7
        assert peak_tflops(gpu, torch.float32, ["conv", "dense"])[0] is None
        assert peak_tflops(gpu, torch.bfloat16, ["conv", "dense"])[0] == 989.4
    with float32_matmul_precision("high"), cudnn_allow_tf32(True):
        assert peak_tflops(gpu, torch.float32, ["conv", "dense"])[0] == 494.7
    with cudnn_allow_tf32(False):
        assert peak_tflops(gpu, torch.float32, ["conv"])[0] == 66.9
    assert peak_tflops(None, torch.float32)[0] is None


@pytest.mark.skipif(not pk.available_backends()["cpu"], reason="needs the compiled extension (pcdeq_C ops)")
def test_call_path_times_fixed_point_against_the_compiled_ops(tmp_path, capsys):
    # the module checks that fixed_point's answers (z*, dL/du, dL/dW) are the ops' before timing them
    from pcdeq_kernels.bench import call_path

    out = tmp_path / "call.json"
    assert call_path.main(["--batch", "8", "--dim", "12", "--rounds", "5", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["figures"]) == {"forward/op", "forward/fixed_point", "train/ops", "train/fixed_point"}
    assert all(f["median_us"] > 0 for f in result["figures"].values()) and result["ratios"]["forward"] > 0
    assert result["machine"]["cpu_model"] is not None or result["machine"]["avx512"] is None
    assert "ratio forward" in capsys.readouterr().out


@pytest.mark.skipif(not pk.available_backends()["cpu"], reason="needs the compiled extension (pcdeq_C ops)")
def test_threads_under_load_times_both_thread_counts_idle_and_busy(tmp_path):
    from pcdeq_kernels.bench import threads_under_load

    out = tmp_path / "threads.json"
    threads = torch.get_num_threads()
    try:
        assert threads_under_load.main(["--shapes", "8x12", "--seconds", "0.01", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    figures = json.loads(out.read_text())["figures"]
    assert set(figures) == {f"{load} 8x12 threads={t}" for load in ("idle", "busy") for t in (1, 2)}
    assert all(f["calls"] >= 20 for f in figures.values())


def test_contraction_bench_measures_the_bound_against_the_spectral_radius(tmp_path, capsys):
    from pcdeq_kernels.bench import contraction

    out = tmp_path / "contraction.json"
    assert contraction.main(["--dims", "12", "--epochs", "1", "--eig-samples", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["problem"] for r in rows] == ["benchmark B=64 d=12"] * 2 + ["demo layer, 1 epochs"]
    for r in rows:
        assert not r["bound_below_rho_anywhere"] and len(r["spectral_radius"]) == 3
        assert r["bound_median"] <= r["bound_from_z_median"] <= r["global_rate_median"] * (1 + 1e-9)
        assert r["gap_factor_max"] >= 1 and r["bound_ms"] > 0 and r["cpu_solve_ms"] > 0
    assert "(1-rho)/(1-bound)" in capsys.readouterr().out
