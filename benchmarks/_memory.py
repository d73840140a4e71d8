"""Memory measures for the benchmarks: bytes autograd saves for backward, and a step's peak RSS.

* :func:`saved_activation_bytes` counts what autograd keeps alive between forward and backward
  (the activation memory that dominates training memory). It is deterministic: it depends on the
  graph, not on the allocator, the load of the machine or what ran before.
* :func:`peak_rss_increase` is what the operating system sees: the increase of the process's
  resident set during one call, allocator and library effects included (Linux: exact through
  ``/proc/self``; elsewhere a lower bound from ``ru_maxrss``).
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    Every tensor a graph node saves (the pack hook of ``torch.autograd.graph.saved_tensors_hooks``
    sees each one, including those of custom Functions' ``ctx.save_for_backward``) is counted by its
    whole storage, ``t.untyped_storage().nbytes()``, once per storage: a tensor saved by two nodes,
    or a view of a saved tensor, adds nothing. Storages shared with a tensor of ``exclude`` (e.g. a
    model's parameters and buffers, which a matmul or batch norm saves but which are not
    activations) are not counted. Saved storages are held until ``fn`` returns, so an address freed
    and reused within ``fn`` cannot be mistaken for a storage already counted.

    For a step with one backward (all saved tensors alive together until it runs) this is the
    peak activation memory of the graph. Not counted: tensors a custom Function stores as plain
    ``ctx`` attributes, and the gradients, optimizer state and temporary buffers of the step.
    """
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[tuple[torch.device, int], torch.UntypedStorage] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen.setdefault((t.device, storage.data_ptr()), storage)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(s.nbytes() for s in seen.values())


def clear_peak_rss() -> bool:
    """Reset the process's resident-set high-water mark to its current size (Linux >= 4.0).

    Writing ``5`` to ``/proc/self/clear_refs`` resets ``VmHWM`` (the mm's peak resident set).
    Returns False where that is not possible (other systems, restricted ``/proc``).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _status_kib(field: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in KiB; None where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_increase(fn: Callable[[], object]) -> tuple[int, bool]:
    """Bytes by which the process's peak resident set rose above its size before ``fn()``.

    Returns ``(bytes, exact)``. On Linux the high-water mark is reset first (:func:`clear_peak_rss`)
    and the value is ``VmHWM`` after ``fn`` minus ``VmRSS`` before (``exact=True``). ``VmHWM`` rather
    than ``ru_maxrss``: ``getrusage`` also reports the peak of the image the process replaced at
    ``exec`` (for a subprocess, a fork of its parent), which ``clear_refs`` does not reset, so in a
    child of a large process it stays at the parent's size. Elsewhere it is the rise of
    ``ru_maxrss``, which misses whatever stays below an earlier, higher peak (a lower bound,
    ``exact=False``). Pages an allocator kept resident from earlier calls are reused without raising
    the RSS, so run this in a fresh process and with glibc's ``MALLOC_MMAP_THRESHOLD_`` set low
    (large blocks are then mapped and unmapped per allocation, and RSS follows the live tensors).
    """
    exact = clear_peak_rss()
    before_kib = _status_kib("VmRSS") if exact else None
    if before_kib is None:
        exact, before_kib = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after_kib = _status_kib("VmHWM") if exact else None
    if after_kib is None:
        exact, after_kib = False, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return 1024 * max(0, after_kib - before_kib), exact
