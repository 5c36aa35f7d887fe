"""DistributedDataParallel on CPU with gloo: 2 processes, each half the batch, give the gradients of
one process on the whole batch (per-sample stopping makes each sample's solve independent of the
rest of its batch)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import pcdeq_kernels as pk

BATCH, FEATURES = 8, 6


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, FEATURES),
        pk.PCDEQLinear(FEATURES, "tanh", tol=1e-12, max_iter=1000),
        torch.nn.Linear(FEATURES, 3),
    ).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, FEATURES, generator=g, dtype=torch.float64), torch.randint(0, 3, (BATCH,), generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(_model())
        x, y = _data()
        shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        _loss(model, x[shard], y[shard]).backward()
        torch.save([p.grad for p in model.module.parameters()], os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_single_process():
    model = _model()
    x, y = _data()
    _loss(model, x, y).backward()
    expected = [p.grad for p in model.parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"grads{rank}.pt"))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
