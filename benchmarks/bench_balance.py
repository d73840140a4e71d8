"""Milliseconds per training step of every balancing method on a small conv net.

Two models, each with T = 3 and T = 10 tasks:

* ``HPS``: hard parameter sharing (shared encoder + ``mtnorm.TaskHeads``): gradient methods pay
  T backward passes through the encoder (``HPS-rep``: gradients with respect to the encoder
  output instead, one encoder backward);
* ``TSσBN``: the same encoder converted with ``mtnorm.convert(..., norm="sigma")`` and run with
  ``mtnorm.forward_tasks(mode="sequential")``: the T task graphs are disjoint, so the T per-task
  backwards cost one ordinary backward and every method costs about what EW costs.

A step is forward + ``balancer.backward`` + ``SGD.step``, timed by default in process CPU time
on one thread, which other jobs on a shared machine barely disturb (``--clock wall --threads 2``
for wall-clock time on both cores). Methods are timed side by side:
repeats are interleaved across methods in a rotating order and the median is reported, along with
each method's ratio to EW on the same model. If TorchJD or LibMTL import, their UPGrad / DB-MTL
are timed too (optional; neither is a dependency, and a failure only skips them).

    .venv/bin/python benchmarks/bench_balance.py            # the full table, ~2-3 minutes
    .venv/bin/python benchmarks/bench_balance.py --quick    # a few methods, a few seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn

import mtnorm
from _timing import CLOCKS, add_clock_argument, measure
from mtnorm import balance

LEARNED = {"uw", "imtl_l", "gradnorm"}
LOSS_BASED = {"ew", "uw", "dwa", "rlw", "gls", "imtl_l", "log", "famo"}


def encoder() -> nn.Sequential:
    def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


class HardSharing(nn.Module):
    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.encoder = encoder()
        self.heads = mtnorm.TaskHeads({t: nn.Linear(32, 10) for t in tasks})

    def forward(self, x: torch.Tensor) -> dict:
        self.features = self.encoder(x)
        return self.heads(self.features)


def tsbn_model(tasks: list[str]) -> nn.Module:
    model = nn.Sequential(encoder(), mtnorm.TaskHeads({t: nn.Linear(32, 10) for t in tasks}))
    return mtnorm.convert(model, tasks, norm="sigma")


def make_step(kind: str, method: str, tasks: list[str], batch: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = HardSharing(tasks) if kind.startswith("HPS") else tsbn_model(tasks)
    shared = (
        list(model.encoder.parameters()) if kind.startswith("HPS") else mtnorm.shared_parameters(model)
    )
    b = balance.get(method, tasks=tasks) if method in LEARNED else balance.get(method)
    opt = torch.optim.SGD([*model.parameters(), *b.parameters()], lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = {t: torch.randint(0, 10, (batch,)) for t in tasks}
    mode = "sequential" if kind == "TSσBN" else "auto"

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = mtnorm.forward_tasks(model, x, mode=mode)
        losses = {t: nn.functional.cross_entropy(out[t], y[t]) for t in tasks}
        rep = model.features if kind == "HPS-rep" else None
        b.backward(losses, shared, rep=rep)
        opt.step()

    return step


def _skips_rep(method: str, tasks: list[str]) -> bool:
    if method in LOSS_BASED - {"ew"}:
        return True
    b = balance.get(method, tasks=tasks) if method in LEARNED else balance.get(method)
    return b.gradient_state


def external_steps(kind: str, tasks: list[str], batch: int) -> dict[str, Callable[[], None]]:
    """TorchJD's UPGrad and LibMTL's DB-MTL on the same model, if they import (both optional)."""
    torch.manual_seed(0)
    model = HardSharing(tasks) if kind == "HPS" else tsbn_model(tasks)
    shared = list(model.encoder.parameters()) if kind == "HPS" else mtnorm.shared_parameters(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = {t: torch.randint(0, 10, (batch,)) for t in tasks}
    mode = "sequential" if kind == "TSσBN" else "auto"

    def task_losses() -> list[torch.Tensor]:
        opt.zero_grad(set_to_none=True)
        out = mtnorm.forward_tasks(model, x, mode=mode)
        return [nn.functional.cross_entropy(out[t], y[t]) for t in tasks]

    steps: dict[str, Callable[[], None]] = {}
    try:
        import torchjd
        from torchjd.aggregation import UPGrad
    except ImportError as err:
        print(f"torchjd:upgrad not compared: torchjd is not installed ({err}); pip install torchjd")
    else:
        aggregator = UPGrad()
        if hasattr(torchjd, "jac_to_grad"):
            # torchjd >= 0.9: backward stores the Jacobian in .jac, jac_to_grad aggregates it
            def torchjd_step() -> None:
                torchjd.backward(task_losses(), inputs=shared)
                torchjd.jac_to_grad(shared, aggregator)
                opt.step()

        else:  # the older one-call API: backward(tensors, aggregator, inputs=...)

            def torchjd_step() -> None:
                torchjd.backward(task_losses(), aggregator, inputs=shared)
                opt.step()

        steps["torchjd:upgrad"] = torchjd_step
    try:
        from LibMTL.weighting import DB_MTL

        class LibMTLDBMTL(DB_MTL):  # LibMTL expects to be mixed into its model class
            def __init__(self) -> None:
                super().__init__()
                self.task_num, self.rep_grad, self.device = len(tasks), False, torch.device("cpu")

            def get_share_params(self) -> list[torch.Tensor]:
                return shared

            def zero_grad_share_params(self) -> None:
                for p in shared:
                    p.grad = None

        weighting = LibMTLDBMTL()
        weighting.init_param()

        def libmtl_step() -> None:
            weighting.backward(torch.stack(task_losses()), DB_beta=0.9, DB_beta_sigma=0.0)
            opt.step()

        steps["libmtl:db_mtl"] = libmtl_step
    except ImportError as err:
        print(f"libmtl:db_mtl not compared: LibMTL is not installed ({err})")
    working = {}
    for name, step in steps.items():
        try:
            step()
            working[name] = step
        except Exception as err:  # an optional comparison must never break the benchmark
            print(f"{name} not compared: its step failed ({type(err).__name__}: {err})")
    return working


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="3,10", help="comma-separated task counts")
    parser.add_argument("--methods", default=",".join(balance.available()))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--inner", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    add_clock_argument(parser)
    parser.add_argument("--quick", action="store_true", help="ew, db_mtl, mgda; T=3; 3 rounds")
    args = parser.parse_args()
    methods = ["ew", "db_mtl", "mgda"] if args.quick else args.methods.split(",")
    counts = [3] if args.quick else [int(t) for t in args.tasks.split(",")]
    rounds = 3 if args.quick else args.rounds
    if "ew" not in methods:
        methods.insert(0, "ew")
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]

    kinds = ["HPS", "HPS-rep", "TSσBN"]
    columns: dict[tuple[str, int], dict[str, float]] = {}
    for t in counts:
        tasks = [f"task{i}" for i in range(t)]
        for kind in kinds:
            # Loss weighting ignores rep (it never forms per-task gradients) and DB-MTL's EMA refuses
            # it (Balancer.gradient_state): no HPS-rep column for them.
            timed = [m for m in methods if kind != "HPS-rep" or not _skips_rep(m, tasks)]
            steps = {m: make_step(kind, m, tasks, args.batch) for m in timed}
            if kind != "HPS-rep":
                steps.update(external_steps(kind, tasks, args.batch))
            columns[(kind, t)] = measure(steps, 2, rounds, clock, inner=args.inner)

    names = list(dict.fromkeys(n for col in columns.values() for n in col if not n.endswith(" min")))
    header = ["method"]
    for t in counts:
        header += [f"{k} T={t}" for k in kinds] + [f"TSσBN T={t} / EW"]
    print(
        f"ms/step ({args.clock} time), median of {rounds} interleaved repeats of {args.inner} "
        f"step(s); batch {args.batch}x3x32x32, {torch.get_num_threads()} thread(s)\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in names:
        row = [name]
        for t in counts:
            for kind in kinds:
                value = columns[(kind, t)].get(name)
                row.append("-" if value is None else f"{value:.1f}")
            ts = columns[("TSσBN", t)]
            row.append(f"{ts[name] / ts['ew']:.2f}x" if name in ts else "-")
        print("| " + " | ".join(row) + " |")
    for name in (n for n in names if ":" in n):  # external libraries against our version
        ours = name.split(":")[1]
        ratios = [
            f"{kind} T={t}: {col[name] / col[ours]:.2f}x"
            for (kind, t), col in columns.items()
            if name in col and ours in col
        ]
        print(f"\n{name} / mtnorm {ours}: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
