"""torch.compile vs eager for a converted model: compile time and steady-state step time.

A converted small ResNet (TSσBN, T=3 tasks, 32x32 inputs). For each of eval forward and training
step (forward + backward + SGD step), sequential task passes and one batched pass: the time of the
first compiled call (compilation included, wall clock), and the steady-state time per call of eager
and compiled code measured side by side (interleaved repeats, process CPU time by default). One
compiled graph serves every task (the task index is data), so the sequential row compiles once for
all three tasks.

    .venv/bin/python benchmarks/bench_compile.py [--batch 8] [--reps 15] [--clock wall]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import mtnorm
from _timing import CLOCKS, add_clock_argument, measure

TASKS = ("a", "b", "c")


def block(c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


def model(width: int) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        block(width, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        mtnorm.TaskHeads({t: nn.Linear(4 * width, 10) for t in TASKS}),
    )
    return mtnorm.convert(net, TASKS, norm="sigma")


def step_fn(net: nn.Module, runner: nn.Module, x: torch.Tensor, mode: str, train: bool):
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    net.train(train)

    def forward() -> None:
        with torch.no_grad():
            mtnorm.forward_tasks(runner, x, mode=mode)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = mtnorm.forward_tasks(runner, x, mode=mode)
        sum(o.pow(2).mean() for o in out.values()).backward()
        opt.step()

    return step if train else forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    add_clock_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, 3, 32, 32)
    print(f"converted ResNet width {args.width}, T={len(TASKS)}, B={args.batch}, 32x32, "
          f"torch {torch.__version__}, {args.threads} thread(s), clock={args.clock}")
    print("| what | mode | first compiled call (s, wall) | eager ms | compiled ms | eager / compiled |")
    print("|---|---|---|---|---|---|")
    for train in (False, True):
        for mode in ("sequential", "batched"):
            torch._dynamo.reset()
            eager_net = model(args.width)
            compiled_net = copy.deepcopy(eager_net)
            runner = torch.compile(compiled_net)
            eager = step_fn(eager_net, eager_net, x, mode, train)
            compiled = step_fn(compiled_net, runner, x, mode, train)
            start = time.perf_counter()
            compiled()
            first = time.perf_counter() - start
            times = measure({"eager": eager, "compiled": compiled}, 2, args.reps, CLOCKS[args.clock])
            what = "training step" if train else "eval forward"
            print(
                f"| {what} | {mode} | {first:.1f} | {times['eager']:.2f} | {times['compiled']:.2f} | "
                f"{times['eager'] / times['compiled']:.2f}x |"
            )


if __name__ == "__main__":
    main()
