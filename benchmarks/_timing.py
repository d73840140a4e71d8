"""The timing harness both benchmarks share: interleaved repeats on a chosen clock."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def add_clock_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="cpu",
        help="cpu: process CPU time, robust to other jobs on a shared machine; wall: perf_counter",
    )


def measure(
    variants: dict[str, Callable[[], None]],
    warmup: int,
    reps: int,
    clock: Callable[[], float] = time.process_time,
    inner: int = 1,
) -> dict[str, float]:
    """Median and minimum (key ``"<name> min"``) ms per call of each variant on ``clock``.

    Every repeat runs all variants in a rotating order, so load from other processes that drifts
    over the run affects all variants alike; the minimum is the least disturbed repeat. A repeat
    times ``inner`` calls in a row and reports their mean.
    """
    names = list(variants)
    for _ in range(warmup):  # allocations, lazy state
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = clock()
            for _ in range(inner):
                variants[name]()
            times[name].append((clock() - start) / inner)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()} | {
        f"{name} min": 1e3 * min(ts) for name, ts in times.items()
    }
