"""Collectives, bytes and step time of distributed training: the flat all-reduce against the hooks.

Spawns ``--world`` gloo processes on 127.0.0.1 (one thread each). In every process, for each model
and balancer, a :class:`mtnorm.train.Trainer` (method ``tssbn``, Adam, fp32) is built on a fixed
synthetic training split (the benchmark data need not be installed) once per gradient sync:

* ``flat`` (the default): one flat all-reduce of the step's gradients (gradient balancers: of the
  loss values, the per-task gradients G and the task-specific gradients, before combining);
* ``hooks`` (``MTNORM_GRAD_SYNC=hooks``, the previous path): one all-reduce per parameter
  gradient as autograd produces it, per task pass, plus one of the loss values;
* ``ddp`` (``MTNORM_GRAD_SYNC=ddp``, equal weighting only): DistributedDataParallel's buckets
  (25 MiB), reduced during backward, plus one all-reduce of the loss values. Its bucket
  all-reduces are counted through DDP's default comm hook registered in Python.

A step is what ``Trainer`` runs per batch: the stop-flag all-reduce, then ``train_step`` on a
global batch of ``--batch`` x world. ``torch.distributed.all_reduce`` and ``all_gather`` are
wrapped to count calls and payload bytes (for an all-gather: this process's contribution),
attributed to who issued them: gradients (``train/distributed.py``), the trainer (stop flag, loss
values) and the task-norm statistics (``norm/sync.py``: one all-gather in forward and one
all-reduce in backward per task-specific norm layer and pass; the same on every path). Step
time: median wall time per step on rank 0 over ``--steps`` steps after ``--warmup``; on a shared
machine it is only indicative.

Models: ``lenet`` (the MultiFashion LeNet: width 16, hidden 128, 36x36 inputs, 2 tasks) and
``resnet18`` (``mtnorm.models.ResNet18``, classification trunk, 32x32 RGB inputs, 3 ten-class
tasks with pooled linear heads).

Run::

    .venv/bin/python benchmarks/bench_distributed.py --world 2 --models lenet,resnet18
    .venv/bin/python benchmarks/bench_distributed.py --world 4 --models lenet --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

BALANCERS = ("ew", "db_mtl", "pcgrad")
SYNCS = ("hooks", "flat")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _benchmark(model: str, n: int):
    """A ``Benchmark`` on a fixed synthetic split of ``n`` samples."""
    from mtnorm.data import MultiFashion
    from mtnorm.models import ResNet18
    from mtnorm.models.lenet import LeNetEncoder, linear_heads
    from mtnorm.train.benchmarks import Benchmark, Split

    gen = torch.Generator().manual_seed(0)
    if model == "lenet":
        tasks = tuple(MultiFashion.tasks)
        specs = MultiFashion.task_specs(tasks)
        shape = (1, 36, 36)
        backbone = lambda norm: LeNetEncoder(1, 16, 128, 36, norm)  # noqa: E731
        heads = lambda: linear_heads(tasks, 128, 10)  # noqa: E731
    else:
        spec = MultiFashion.task_specs()[MultiFashion.tasks[0]]
        tasks = ("a", "b", "c")
        specs = {t: spec for t in tasks}
        shape = (3, 32, 32)
        backbone = lambda norm: ResNet18(3, norm, dilated=False)  # noqa: E731

        def heads() -> dict[str, nn.Module]:
            pool = (nn.AdaptiveAvgPool2d(1), nn.Flatten())
            return {t: nn.Sequential(*pool, nn.Linear(512, 10)) for t in tasks}

    inputs = torch.randn(n, *shape, generator=gen)
    targets = {t: torch.randint(0, 10, (n,), generator=gen) for t in tasks}
    split = Split(None, inputs, targets)
    return Benchmark(model, tasks, specs, lambda cfg: (split, split), backbone, heads, shape)


def _origin(filename: str) -> str:
    if "ddp_comm_hooks" in filename:  # DDP's bucket all-reduce, through the Python default hook
        return "grad"
    if filename.endswith(os.path.join("train", "distributed.py")):
        return "grad"
    if filename.endswith(os.path.join("norm", "sync.py")):
        return "norm"
    return "trainer"


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    import mtnorm.train.trainer as trainer_module
    from mtnorm.train import Trainer, config_from_dict

    calls: list[tuple[str, int]] = []
    original = dist.all_reduce
    original_gather = dist.all_gather

    def record(tensor) -> None:  # noqa: ANN001
        # the caller of the collective is two frames up: record <- counting <- caller
        calls.append((_origin(sys._getframe(2).f_code.co_filename), tensor.numel() * tensor.element_size()))

    def counting(tensor, *a, **k):  # noqa: ANN001, ANN002, ANN003
        record(tensor)
        return original(tensor, *a, **k)

    def counting_gather(tensor_list, tensor, *a, **k):  # noqa: ANN001, ANN002, ANN003
        record(tensor)  # the task-norm statistics: one all-gather per layer and forward pass
        return original_gather(tensor_list, tensor, *a, **k)

    dist.all_reduce = counting
    dist.all_gather = counting_gather
    rows = []
    try:
        for model in args.models:
            batch = args.batch * world
            n = batch * (args.warmup + args.steps)
            bench = _benchmark(model, n)
            trainer_module.get_benchmark = lambda cfg, bench=bench: bench
            for balancer in args.balancers:
                for sync in SYNCS + (("ddp",) if balancer == "ew" else ()):
                    os.environ["MTNORM_GRAD_SYNC"] = sync
                    cfg = config_from_dict(
                        {
                            "method": "tssbn",
                            "balancer": balancer,
                            "epochs": 1,
                            "seed": 0,
                            "out": str(Path(out) / f"{model}-{balancer}-{sync}"),
                            "data": {"name": "multifashion", "batch_size": batch},
                            "optim": {"scheduler": "none"},
                        }
                    )
                    trainer = Trainer(cfg, log=None)
                    if trainer._ddp_forward is not None:
                        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

                        trainer._ddp_forward.register_comm_hook(None, allreduce_hook)
                    trainer.model.train()
                    times = []
                    marks = []
                    for s in range(args.warmup + args.steps):
                        index = torch.arange(s * batch, (s + 1) * batch)
                        dist.barrier()
                        marks.append(len(calls))
                        start = time.perf_counter()
                        trainer._stop_requested()
                        trainer.train_step(index)
                        times.append(time.perf_counter() - start)
                    marks.append(len(calls))
                    step = calls[marks[-2] : marks[-1]]  # the last step (all steps are alike)
                    row = {
                        "model": model,
                        "balancer": balancer,
                        "sync": sync,
                        "params": sum(1 for p in trainer.model.parameters() if p.requires_grad),
                        "numel": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
                        "ms": 1000 * statistics.median(times[args.warmup :]),
                    }
                    for kind in ("grad", "trainer", "norm"):
                        row[f"{kind}_calls"] = sum(1 for k, _ in step if k == kind)
                        row[f"{kind}_bytes"] = sum(b for k, b in step if k == kind)
                    rows.append(row)
                    if trainer.grad_transform is not None:
                        trainer.grad_transform.remove()
        if rank == 0:
            Path(out, "rows.json").write_text(json.dumps(rows))
    finally:
        dist.all_reduce = original
        dist.all_gather = original_gather
        dist.destroy_process_group()


def _mb(b: int) -> str:
    return f"{b / 2**20:.2f} MB" if b >= 2**20 else f"{b / 2**10:.1f} kB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--models", default="lenet", help="comma-separated: lenet, resnet18")
    parser.add_argument("--balancers", default=",".join(BALANCERS))
    parser.add_argument("--batch", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    args.models = args.models.split(",")
    args.balancers = args.balancers.split(",")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
        rows = json.loads(Path(out, "rows.json").read_text())
    print(
        f"# {datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"gloo, world {args.world}, batch {args.batch}/process, {args.steps} steps after {args.warmup}"
    )
    print(f"# {' '.join(sys.argv)}")
    print(
        "| model | #tensors | balancer | sync | grad collectives/step | grad bytes/step | trainer "
        "collectives/step | norm-stat collectives/step | step ms | vs hooks |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {(r["model"], r["balancer"]): r["ms"] for r in rows if r["sync"] == "hooks"}
    for r in rows:
        ratio = r["ms"] / base[(r["model"], r["balancer"])]
        print(
            f"| {r['model']} | {r['params']} | {r['balancer']} | {r['sync']} | {r['grad_calls']} | "
            f"{_mb(r['grad_bytes'])} | {r['trainer_calls']} | {r['norm_calls']} | {r['ms']:.1f} | "
            f"{ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
