"""Per-step time and memory of every multi-task method (architecture) relative to HPS.

For each method of ``mtnorm.models.build_method`` on the MultiFashion backbone (LeNet width 16,
hidden 128, 36x36 inputs, batch 32) and on the FashionScenes one (SegNet width 16, 3 levels, 64x64
inputs, segment / depth / normal heads, batch 8), one training step as the trainer runs it with
equal weighting: ``forward_tasks(model, x, mode="auto")``, the per-task losses of
``mtnorm.train.losses.loss_for``, ``sum(losses).backward()`` and an Adam step on the trainer's
parameter groups. Every method gets the same fixed synthetic batch (seeded random inputs and
targets of the right kinds; the benchmark data need not be installed). The table reports:

* ``#P`` (trainable parameters) and ``#F`` (forward FLOPs of all tasks' outputs per input, eval mode),
  from ``mtnorm.profile.profile``, with their ratios to HPS; ``train #F``: the ratio of the forward
  FLOPs the training step itself runs (training mode, ``mode="auto"``; differs for LTB);
* step time: the median process CPU time per step on one thread over interleaved repeats after
  warm-up (``_timing.measure``: every repeat runs every method once, in a rotating order), and its
  ratio to HPS (in brackets: the ratio of the fastest repeats);
* saved activations: bytes of the distinct storages autograd saves for backward during the step,
  parameters and buffers excluded (``_memory.saved_activation_bytes``; deterministic);
* peak RSS: the rise of the resident set during one steady-state step (after two warm-up steps,
  so optimizer state and lazy initialisation are excluded), measured in a fresh process per
  method (forked from a server process that only imported the modules, :class:`RssServer`) with
  glibc's ``MALLOC_MMAP_THRESHOLD_`` lowered so freed tensors are returned to the system
  (``_memory.peak_rss_increase``: ``VmHWM`` after the step minus ``VmRSS`` before, with the
  high-water mark reset through ``/proc/self/clear_refs``; Linux).

Run (2-4 minutes of wall time for both benchmarks on the shared 2-core machine)::

    .venv/bin/python benchmarks/bench_arch.py --benchmark both
    .venv/bin/python benchmarks/bench_arch.py --methods hps,tssbn,mmoe --reps 3 --no-rss   # quick look
    .venv/bin/python benchmarks/bench_arch.py --benchmark scenes13   # all 13 FashionScenes tasks
    .venv/bin/python benchmarks/bench_arch.py --benchmark multifashion12   # left, right, 10 has_<class>
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from _memory import peak_rss_increase, saved_activation_bytes
from _timing import measure
from mtnorm.data.multifashion import MultiFashion
from mtnorm.data.scenes import SCENE_TASKS
from mtnorm.data.spec import TaskSpec
from mtnorm.models.methods import available_methods, build_method, default_norm_lr_mult
from mtnorm.norm import choose_mode, forward_tasks, param_groups
from mtnorm.norm.routing import has_task_norms
from mtnorm.profile import profile
from mtnorm.train.benchmarks import Benchmark, get_benchmark
from mtnorm.train.config import Config
from mtnorm.train.loop import task_losses
from mtnorm.train.losses import loss_for

BATCH = {"multifashion": 32, "multifashion12": 32, "scenes": 8, "scenes13": 8}
MANY_TASKS = {"scenes13": ("scenes", SCENE_TASKS), "multifashion12": ("multifashion", MultiFashion.all_tasks)}
LR = 1e-3  # the trainer's defaults (OptimConfig): Adam, lr 1e-3, layer-norm multiplier 10
LAYERNORM_LR_MULT = 10.0
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}


@dataclass
class Setup:
    """One method on one benchmark: the model, its fixed batch and a closure running a training step."""

    method: str
    model: nn.Module
    x: torch.Tensor
    step: Callable[[], None]
    mode: str  # what mode="auto" runs: "one call" (no task-specific norms), "sequential", "batched"


def load_benchmark(name: str) -> Benchmark:
    """The benchmark's tasks, specs, backbone and heads with the default model config (no data read).

    ``scenes13`` is FashionScenes with all 13 tasks (segment, depth, normal and the 10 has_<class>
    attributes, configs/scenes13.yaml) and ``multifashion12`` MultiFashion with its 10 attributes
    (configs/multifashion12.yaml): the many-task regime, where T task passes cost most.
    """
    cfg = Config()
    cfg.data.name, tasks = MANY_TASKS.get(name, (name, None))
    if tasks is not None:
        cfg.data.tasks = list(tasks)
    return get_benchmark(cfg)


def synthetic_targets(
    specs: dict[str, TaskSpec], batch: int, spatial: tuple[int, ...], gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random targets of each task's kind (every depth pixel and normal valid, no ignored labels)."""
    out = {}
    for task, spec in specs.items():
        if spec.kind == "classification":
            out[task] = torch.randint(0, spec.num_outputs, (batch,), generator=gen)
        elif spec.kind == "segmentation":
            out[task] = torch.randint(0, spec.num_outputs, (batch, *spatial), generator=gen)
        elif spec.kind == "depth":
            out[task] = 0.1 + torch.rand(batch, 1, *spatial, generator=gen)
        elif spec.kind == "normal":
            out[task] = nn.functional.normalize(torch.randn(batch, 3, *spatial, generator=gen), dim=1)
        elif spec.kind == "binary":
            out[task] = torch.randint(0, 2, (batch,), generator=gen).float()
        else:  # regression
            out[task] = torch.randn(batch, spec.num_outputs, generator=gen)
    return out


def make_setup(benchmark: str, method: str, batch: int, seed: int = 0) -> Setup:
    """Build ``method`` on ``benchmark`` and a closure running one trainer-like step (equal weights)."""
    bench = load_benchmark(benchmark)
    assert bench.input_shape is not None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *bench.input_shape, generator=gen)
    y = synthetic_targets(bench.specs, batch, tuple(bench.input_shape[1:]), gen)
    torch.manual_seed(seed)
    model = build_method(method, bench.backbone, bench.tasks, bench.heads(), example_input=x[:2])
    model.train()
    groups = param_groups(
        model, LR, norm_lr_mult=default_norm_lr_mult(method), layernorm_lr_mult=LAYERNORM_LR_MULT
    )
    optimizer = torch.optim.Adam(groups, lr=LR)
    fns = {t: loss_for(spec) for t, spec in bench.specs.items()}

    def step() -> None:  # Trainer.train_step with balancer "ew", fp32, one process
        optimizer.zero_grad(set_to_none=True)
        out = forward_tasks(model, x, mode="auto")
        losses = task_losses(out, y, fns)
        torch.stack(list(losses.values())).sum().backward()
        optimizer.step()

    mode = choose_mode(model, x, len(bench.tasks)) if has_task_norms(model) else "one call"
    return Setup(method, model, x, step, mode)


def train_forward_flops(setup: Setup) -> int:
    """FLOPs of the step's forward (training mode, ``mode="auto"``), which eval-mode #F can miss:
    LTB mixes every node in training but runs only its argmax tree in eval."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        forward_tasks(setup.model, setup.x, mode="auto")
    return counter.get_total_flops()


class RssServer:
    """A process that imports torch and mtnorm once and measures each request in a fresh fork of itself.

    Importing costs about 4 s of CPU per process on this machine, more than the measurement, so
    instead of one ``python`` per method, ``--rss-server`` loads the modules (running no torch op,
    so no thread pool or allocator state exists yet) and forks a child per request: every method
    is measured in a new process whose heap holds nothing but the imports. The server runs with
    ``MALLOC_MMAP_THRESHOLD_`` lowered (glibc reads it at start-up), which its children inherit.
    """

    def __init__(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-server"]
        self.proc = subprocess.Popen(
            cmd, env=os.environ | CHILD_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def measure(self, benchmark: str, method: str, batch: int) -> tuple[float, bool] | None:
        """Peak RSS rise (bytes) of one steady-state step of ``method`` and whether it is exact."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{benchmark} {method} {batch}\n")
        self.proc.stdin.flush()
        result = json.loads(self.proc.stdout.readline() or '{"error": "the RSS server exited"}')
        if "error" in result:
            print(f"peak RSS of {method} on {benchmark} not measured: {result['error']}", file=sys.stderr)
            return None
        return result["bytes"], result["exact"]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def rss_child(benchmark: str, method: str, batch: int) -> dict:
    torch.set_num_threads(1)
    setup = make_setup(benchmark, method, batch)
    for _ in range(2):  # optimizer state, gradients' first allocation, lazy kernels and caches
        setup.step()
    gc.collect()
    increase, exact = peak_rss_increase(setup.step)
    return {"bytes": increase, "exact": exact}


def rss_server() -> None:
    """``--rss-server``: each stdin line ``benchmark method batch`` is measured in a forked child."""
    available_methods()  # imports mtnorm.arch too, so no child pays for it
    for line in sys.stdin:
        benchmark, method, batch = line.split()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, exit without cleanup
            os.close(read)
            os.dup2(2, 1)  # anything printed goes to stderr, not into the server's replies
            try:
                result = rss_child(benchmark, method, int(batch))
            except BaseException as err:  # reported to the parent, which skips the cell
                result = {"error": f"{type(err).__name__}: {err}"}
            with os.fdopen(write, "w") as f:
                f.write(json.dumps(result))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            data = f.read()
        os.waitpid(pid, 0)
        print(data or '{"error": "the measuring process died"}', flush=True)


def bench_one(
    benchmark: str, methods: list[str], batch: int, warmup: int, reps: int, rss: RssServer | None
) -> list[dict]:
    setups = {m: make_setup(benchmark, m, batch) for m in methods}
    base = setups["hps"]
    rows = {m: {"method": m, "mode": s.mode} for m, s in setups.items()}
    for m, s in setups.items():
        prof = profile(s.model, s.x, baseline=base.model)
        frozen = [*s.model.parameters(), *s.model.buffers()]
        rows[m] |= {
            "params": prof.params,
            "params_ratio": prof.params_ratio,
            "flops": prof.flops / batch,
            "flops_ratio": prof.flops_ratio,
            "train_flops": train_forward_flops(s),
            "saved": saved_activation_bytes(s.step, exclude=frozen),
        }
    ms = measure({m: s.step for m, s in setups.items()}, warmup, reps, time.process_time)
    for m in methods:
        rows[m] |= {"ms": ms[m], "ms_min": ms[f"{m} min"]}
    for m in methods:
        rows[m]["rss"] = rss.measure(benchmark, m, batch) if rss is not None else None
    return [rows[m] for m in methods]


def _count(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{prefix}{unit}"
    return f"{n:.0f}{unit}"


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["method"] == "hps")
    lines = [
        "| method (auto runs) | #P | #F / input | train #F / HPS | step ms (CPU time, median) "
        "| time / HPS (minima) | saved activations MB | act. / HPS | peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        rss = r.get("rss")
        rss_cell = "-" if rss is None else f"{rss[0] / 1e6:.1f}" + ("" if rss[1] else " (≥)")
        lines.append(
            f"| {r['method']} ({r['mode']}) | {_count(r['params'])} ({r['params_ratio']:.2f}x) "
            f"| {_count(r['flops'], 'FLOP')} ({r['flops_ratio']:.2f}x) "
            f"| {r['train_flops'] / base['train_flops']:.2f}x | {r['ms']:.1f} "
            f"| {r['ms'] / base['ms']:.2f}x ({r['ms_min'] / base['ms_min']:.2f}x) "
            f"| {r['saved'] / 1e6:.2f} | {r['saved'] / base['saved']:.2f}x | {rss_cell} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", choices=[*BATCH, "both"], default="both")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (multifashion*), 8 (scenes*)")
    parser.add_argument("--reps", type=int, default=7, help="timed repeats per method")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--rss-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_server:
        rss_server()
        return
    torch.set_num_threads(1)
    methods = args.methods.split(",") if args.methods else list(available_methods())
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(available_methods())}")
    if "hps" not in methods:
        methods.insert(0, "hps")
    benchmarks = ["multifashion", "scenes"] if args.benchmark == "both" else [args.benchmark]

    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    print(f"$ {shlex.join([exe, *sys.argv])}\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), {datetime.date.today()}, load average "
        f"{os.getloadavg()[0]:.1f} at start; CPU time, median of {args.reps} interleaved repeats after "
        f"{args.warmup} warm-up steps; synthetic fixed batch; peak RSS in a fresh process per method.\n"
    )
    rss = None if args.no_rss or not hasattr(os, "fork") else RssServer()
    for bench in benchmarks:
        batch = args.batch or BATCH[bench]
        start = time.perf_counter()
        rows = bench_one(bench, methods, batch, args.warmup, args.reps, rss)
        tasks = load_benchmark(bench).tasks
        print(
            f"## {bench} (batch {batch}, tasks {', '.join(tasks)}; "
            f"{time.perf_counter() - start:.0f} s wall)\n"
        )
        print(table(rows) + "\n", flush=True)
    if rss is not None:
        rss.close()


if __name__ == "__main__":
    main()
