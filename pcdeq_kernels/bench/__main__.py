"""python -m pcdeq_kernels.bench: time every backend against the official loop and torchdeq."""

from __future__ import annotations

import argparse
import sys

import torch

from .report import CONV_QUICK_SHAPES, CONV_SHAPES, FULL_SHAPES, QUICK_SHAPES, convergence_history, format_table, run_grid, write_outputs

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) not in (2, 4) for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes look like 64x80,1024x256 (B x d) or 64x82x28x28 (B x C x H x W); got {text!r}")
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcdeq_kernels.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help=f"the small grid {QUICK_SHAPES} (CPU: under 3 minutes)")
    p.add_argument("--shapes", type=_shapes, help="comma-separated BxD or BxCxHxW, e.g. 64x80,8192x4096")
    p.add_argument("--conv", action="store_true", help=f"the convolutional grid {CONV_SHAPES} (with --quick: {CONV_QUICK_SHAPES})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--activation", default="tanh")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--paths", help="comma-separated, official first, e.g. official,reference,cpu,torchdeq-fpi; "
                   "cuda-single, cuda-stepwise, triton-single, triton-stepwise, triton-split force a GPU backend's "
                   "solve loop")
    p.add_argument("--modes", default="forward,train")
    p.add_argument("--min-seconds", type=float, default=0.3, help="time spent per measurement")
    p.add_argument("--out", default="bench-results", help="folder for the JSON and PNG files")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA build of torch and a GPU")
    modes = tuple(args.modes.split(","))
    if not modes or not set(modes) <= {"forward", "train"}:
        p.error(f"--modes takes forward, train or both (comma-separated); got {args.modes!r}")
    if args.conv:
        shapes = args.shapes or (CONV_QUICK_SHAPES if args.quick else CONV_SHAPES)
    else:
        shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    result = run_grid(
        shapes, device=args.device, dtype=DTYPES[args.dtype], activation=args.activation, tol=args.tol,
        modes=modes, paths_to_run=args.paths.split(",") if args.paths else None,
        min_seconds=args.min_seconds, progress=not args.no_progress,
    )
    result["command"] = "python -m pcdeq_kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(format_table(result))
    dense = any(len(shape) == 2 for shape in shapes)  # the convergence illustration is a dense problem
    history = convergence_history(activation=args.activation) if dense else None
    for path in write_outputs(result, history, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
