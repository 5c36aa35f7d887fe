"""Train a pcDEQ network on scikit-learn's bundled handwritten digits (8x8 images, no download).

    python examples/train_digits.py                      # linear pcDEQ-1 (tanh), auto backend, on the GPU if any
    python examples/train_digits.py --model conv --activation sigmoid --backend reference
    python examples/train_digits.py --model paper-single-conv --epochs 5   # the paper's MNIST nets on
    python examples/train_digits.py --model paper-multi-conv --epochs 5    # the digits upsampled to 28x28

``linear`` and ``conv`` are small networks on the 8x8 images; ``paper-single-conv`` (82 channels) and
``paper-multi-conv`` (12, 24, 48 channels) are the paper's MNIST networks (``models.paper_model``),
which need MNIST-sized inputs: the digits are upsampled (bilinear) to 28x28.

Runs on the GPU when torch sees one (``--device cpu`` to stay on the CPU), with per-model default
epochs that keep a CPU run short. Prints the backends, one line per epoch (loss, train/test
accuracy, mean forward and backward iterations of the pcDEQ solves, time) with an estimate of the
total after the first, and the trained layer's contraction bound. Exits non-zero if the final test
accuracy is below --target.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pcdeq_kernels as pk
from pcdeq_kernels.backends import resolve
from pcdeq_kernels.problem import Problem
from pcdeq_kernels.models import LinearPCDEQNet, SingleConvPCDEQNet, paper_model

MODELS = ("linear", "conv", "paper-single-conv", "paper-multi-conv")
# Default epochs per model and device: the paper's networks on the 28x28 images are slow on a CPU
# (single-conv's 82-channel solves above all), so fewer epochs there.
DEFAULT_EPOCHS = {
    "cpu": {"linear": 25, "conv": 15, "paper-single-conv": 3, "paper-multi-conv": 5},
    "cuda": {"linear": 25, "conv": 15, "paper-single-conv": 15, "paper-multi-conv": 15},
}


def load_data(seed: int, size: int = 8):
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=y)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def build_model(kind: str, activation: str, backend: str) -> torch.nn.Module:
    if kind == "linear":
        return LinearPCDEQNet(64, features=80, activation=activation, backend=backend)
    if kind == "conv":
        return SingleConvPCDEQNet(1, 8, channels=32, activation=activation, backend=backend)
    name = kind.removeprefix("paper-").replace("-", "_")
    return paper_model(name, "mnist", activation, backend=backend)


def run_epoch(model, x, y, optimizer=None, batch_size=64):
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(y)) if training else torch.arange(len(y))
    correct, loss_sum, fwd, bwd, batches = 0, 0.0, 0.0, 0.0, 0
    layer = model.pcdeq_layers()[0]
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        with torch.set_grad_enabled(training):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
        if training:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.project_()  # keep W >= 0, as the paper does after every step
            bwd += layer.stats.backward_iterations.float().mean().item()
        fwd += layer.stats.forward_iterations.float().mean().item()
        correct += (logits.argmax(1) == y[idx]).sum().item()
        loss_sum += loss.item() * len(idx)
        batches += 1
    return loss_sum / len(y), correct / len(y), fwd / batches, bwd / batches


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="linear")
    p.add_argument("--activation", choices=sorted(pk.ACTIVATIONS), default="tanh")
    p.add_argument("--backend", default="auto", help="auto, reference, cpu, cuda or triton")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: per model and device (" + "; ".join(
                       f"{d}: " + ", ".join(f"{m} {e}" for m, e in table.items()) for d, table in DEFAULT_EPOCHS.items()) + ")")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.95, help="minimum final test accuracy")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to torch")
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS.get(device.type, DEFAULT_EPOCHS["cpu"])[args.model]

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_data(args.seed, 28 if args.model.startswith("paper-") else 8))
    model = build_model(args.model, args.activation, args.backend).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    layer = model.pcdeq_layers()[0]
    chosen = resolve(layer.spec, Problem("dense" if args.model == "linear" else "conv", device.type, torch.float32, len(y_train)))
    print(f"digits: {len(y_train)} train / {len(y_test)} test images of {tuple(x_train.shape[1:])}; "
          f"{args.model} pcDEQ ({args.activation}) on {device}, backend {args.backend!r} -> {chosen!r}, {args.epochs} epochs")
    for name, status in pk.backend_status().items():
        print(f"  backend {name}: {status}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss, train_acc, fwd, bwd = run_epoch(model, x_train, y_train, optimizer)
        scheduler.step()
        _, test_acc, test_fwd, _ = run_epoch(model, x_test, y_test)
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch:3d}  loss {loss:.4f}  train {train_acc:.4f}  test {test_acc:.4f}  "
              f"fwd iters {fwd:5.1f}  bwd iters {bwd:5.1f}  time {elapsed:6.1f}s", flush=True)
        if epoch == 1 and args.epochs > 1:
            print(f"  (about {elapsed:.0f}s per epoch: {elapsed * args.epochs:.0f}s for {args.epochs} epochs)", flush=True)
    stats = model.pcdeq_layers()[0].stats  # of the last test batch
    bound = stats.contraction_bound
    print(f"trained layer on the last test batch: {stats.forward_iterations.float().mean():.1f} forward iterations; "
          f"contraction bound (each step shrinks the error by about this factor) median {bound.median():.3f}, "
          f"max {bound.max():.3f}")
    print(f"final test accuracy {test_acc:.4f} (target {args.target}) in {time.perf_counter() - start:.1f}s on backend {stats.backend!r}")
    return 0 if test_acc >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
