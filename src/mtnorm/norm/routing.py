"""Task routing: which task a converted model runs, chosen on the model by a context manager.

A converted model keeps every convolution and linear layer shared; only its *routed* modules
(task-specific norm layers and :class:`TaskHeads`) depend on the task. Each routed module holds a
route: a task index, :data:`BATCHED` (the batch holds T equal chunks, chunk ``t`` belongs to task
``t``), or ``None`` (no task chosen). The route lives on the modules of the model it was set on,
never in a global, so two models (or two threads with two models) route independently.

``use_task(model, "depth")`` sets the route for the duration of a ``with`` block and restores the
previous one afterwards; :func:`forward_tasks` runs every task, either as T separate passes or as
one batched pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

BATCHED = -1
"""Route value meaning "the batch is T task chunks, chunk t is task t"."""


def validate_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    """Check a list of task names: non-empty strings, at least one, no duplicates."""
    if isinstance(tasks, (set, frozenset)):
        raise TypeError(
            f"tasks must be an ordered sequence (list or tuple), got a {type(tasks).__name__}: its "
            "order changes between Python processes, so outputs, checkpoints and rows of G would "
            f"silently swap tasks; write sorted({sorted(tasks)!r}) or the list in your order"
        )
    if isinstance(tasks, str):
        raise TypeError(
            f"tasks must be a sequence of task names, got the single string {tasks!r}; "
            f"write [{tasks!r}] for one task"
        )
    try:
        names = tuple(tasks)
    except TypeError:
        raise TypeError(f"tasks must be a sequence of strings, got {type(tasks).__name__}") from None
    if not names:
        raise ValueError("tasks is empty: give at least one task name, e.g. ['segment', 'depth']")
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"task names must be strings, got {name!r} ({type(name).__name__})")
        if not name:
            raise ValueError("task names must be non-empty strings, got ''")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate task names: {dupes}; each task needs its own name")
    return names


class PerTask(dict):
    """A dict ``task -> output`` that a model returns when it has already split its output by task.

    :func:`forward_tasks` passes a ``PerTask`` through unchanged instead of splitting it along the
    batch, which is how heads with different output shapes come back from a batched pass.
    """


class TaskRouted(nn.Module):
    """Base of every module whose computation depends on the task route.

    Subclasses read :attr:`route` in ``forward``: an index into :attr:`tasks`, :data:`BATCHED`,
    or ``None``. They never set it; :func:`use_task` and :func:`forward_tasks` do.

    The route is held twice, for two readers. Eager code reads the Python value :attr:`route`.
    Code compiled by ``torch.compile`` reads only the two flags ``routed``/``batched`` and the task
    index as *data*, the non-persistent long buffer ``task_id``: Dynamo guards on Python values it
    reads but not on buffer contents, so one compiled graph serves every task and ``use_task``
    never triggers a recompile (at most one more graph for the batched pass). ``batch_dim`` is the
    dimension a batched pass stacks the task chunks along (``forward_tasks(..., batch_dim=)``).
    Copies (``copy.deepcopy``, pickling) come out unrouted.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = validate_tasks(tasks)
        # every task's index once, so a route change selects a view instead of allocating
        self.register_buffer("task_ids", torch.arange(len(self.tasks)), persistent=False)
        self.register_buffer("task_id", self.task_ids[0], persistent=False)
        self.batch_dim = 0
        self.route = None

    @property
    def route(self) -> int | None:
        return self._route

    @route.setter
    def route(self, value: int | None) -> None:
        # plain attributes written to __dict__ directly: use_task sets them on every routed module
        # for every task pass, and nn.Module.__setattr__'s checks cost more than the write
        state = self.__dict__
        routed, batched = value is not None, value == BATCHED
        state.update(_route=value, routed=routed, batched=batched)
        # Another tensor rather than an in-place write: a compiled backward may have saved the
        # previous one (T task passes, then one backward), and must find it unchanged. One view
        # per task, made once per index buffer (a .to() replaces the buffer and so the views).
        ids = self._buffers.get("task_ids")
        if ids is None:
            return
        views = state.get("_task_id_views")
        if views is None or views[0] is not ids:
            views = state["_task_id_views"] = (ids, ids.unbind(0))
        self._buffers["task_id"] = views[1][value if routed and not batched else 0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.update(_route=None, routed=False, batched=False, batch_dim=0)
        state.pop("_task_id_views", None)
        return state

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        # Tagged so that a balancer can warn when task-specific parameters are passed as shared.
        if param is not None:
            param._mtnorm_task_specific = True  # type: ignore[attr-defined]
        super().register_parameter(name, param)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def task_index(self, task: str) -> int:
        try:
            return self.tasks.index(task)
        except ValueError:
            raise KeyError(
                f"unknown task {task!r}; this model's tasks are {list(self.tasks)}"
            ) from None

    def _require_route(self) -> int:
        """The route, or a clear error when no task was chosen."""
        if self.route is None:
            raise RuntimeError(
                f"{type(self).__name__} has no task chosen. Run one task with "
                "`with mtnorm.use_task(model, task): model(x)` or all of them with "
                f"`mtnorm.forward_tasks(model, x)`; tasks: {list(self.tasks)}"
            )
        return self.route

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}"


def routed_modules(model: nn.Module) -> list[TaskRouted]:
    return [m for m in model.modules() if isinstance(m, TaskRouted)]


def tasks_of(model: nn.Module) -> tuple[str, ...]:
    """The task names of a converted model (every routed module must agree)."""
    found = {m.tasks for m in routed_modules(model)}
    if not found:
        raise ValueError(
            "this model has no task-specific modules; convert it first with "
            "mtnorm.convert(model, tasks) or give it mtnorm.TaskHeads"
        )
    if len(found) > 1:
        raise ValueError(f"the model's task-specific modules disagree on the tasks: {sorted(found)}")
    return found.pop()


def _set_route(
    modules: Sequence[TaskRouted], route: int | None, batch_dim: int = 0
) -> list[tuple[int | None, int]]:
    previous = [(m.route, m.batch_dim) for m in modules]
    for m in modules:
        m.route = route
        m.batch_dim = batch_dim
    return previous


def _restore_route(modules: Sequence[TaskRouted], previous: list[tuple[int | None, int]]) -> None:
    for m, (route, batch_dim) in zip(modules, previous):
        m.route = route
        m.batch_dim = batch_dim


@contextlib.contextmanager
def use_task(model: nn.Module, task: str) -> Iterator[nn.Module]:
    """Run ``model`` as the single-task network of ``task`` inside the ``with`` block.

    >>> with mtnorm.use_task(model, "depth"):
    ...     depth = model(x)

    The previous route is restored on exit, so blocks nest.
    """
    modules = routed_modules(model)
    tasks = tasks_of(model)
    if task not in tasks:
        raise KeyError(f"unknown task {task!r}; this model's tasks are {list(tasks)}")
    previous = _set_route(modules, tasks.index(task))
    try:
        yield model
    finally:
        _restore_route(modules, previous)


@contextlib.contextmanager
def batched_tasks(model: nn.Module, batch_dim: int = 0) -> Iterator[nn.Module]:
    """Inside the block, ``model(x)`` treats ``x`` as T equal chunks along ``batch_dim``, one per
    task."""
    modules = routed_modules(model)
    previous = _set_route(modules, BATCHED, batch_dim)
    try:
        yield model
    finally:
        _restore_route(modules, previous)


def has_task_norms(model: nn.Module) -> bool:
    from mtnorm.norm.layers import TaskNorm

    return any(isinstance(m, TaskNorm) for m in model.modules())


def _rebuild(out: Any, values: Any) -> Any:
    """A container of ``type(out)`` holding ``values``: namedtuples, tuples and lists, and mapping
    types (OrderedDict, transformers' ``ModelOutput``, which takes its fields as keywords)."""
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)._make(values)
    if isinstance(out, (tuple, list)):
        return type(out)(values)
    if type(out) is dict:
        return dict(values)
    try:
        return type(out)(**dict(values))
    except TypeError:
        return type(out)(dict(values))


def _split_output(out: Any, num_tasks: int, dim: int = 0) -> list[Any]:
    """Split a batched output along ``dim`` into per-task chunks, keeping container types."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[dim] % num_tasks:
            raise ValueError(
                f"cannot split an output of shape {tuple(out.shape)} into {num_tasks} task chunks "
                f"along dim {dim}; return mtnorm.PerTask from the model, or use mode='sequential'"
            )
        return list(out.chunk(num_tasks, dim=dim))
    if isinstance(out, (tuple, list)):
        parts = [_split_output(o, num_tasks, dim) for o in out]
        return [_rebuild(out, [p[t] for p in parts]) for t in range(num_tasks)]
    if isinstance(out, Mapping):
        parts = {k: _split_output(v, num_tasks, dim) for k, v in out.items()}
        return [_rebuild(out, [(k, v[t]) for k, v in parts.items()]) for t in range(num_tasks)]
    if out is None:
        return [None] * num_tasks
    raise TypeError(
        f"forward_tasks cannot split a model output of type {type(out).__name__}; return tensors, "
        "tuples, dicts, or mtnorm.PerTask"
    )


def _repeat_input(x: Any, num_tasks: int, dim: int, batch: int) -> Any:
    """Repeat every tensor whose size along ``dim`` is the batch size ``batch``, T times along
    ``dim`` (nested in tuples, lists and dicts); other values (masks that broadcast, scalars,
    options) pass unchanged."""
    if isinstance(x, torch.Tensor):
        if x.dim() > dim and x.shape[dim] == batch:
            reps = [1] * x.dim()
            reps[dim] = num_tasks
            return x.repeat(*reps)
        return x
    if isinstance(x, (tuple, list)):
        return _rebuild(x, [_repeat_input(v, num_tasks, dim, batch) for v in x])
    if isinstance(x, Mapping):
        return _rebuild(x, [(k, _repeat_input(v, num_tasks, dim, batch)) for k, v in x.items()])
    return x


def sequence_first_modules(model: nn.Module) -> list[str]:
    """Modules whose batch is not in dim 0 (``batch_first=False``): attention, transformer layers
    and recurrent layers. ``mode="auto"`` does not batch such a model unless ``batch_dim`` is given."""
    kinds = (
        nn.MultiheadAttention,
        nn.TransformerEncoderLayer,
        nn.TransformerDecoderLayer,
        nn.Transformer,
        nn.RNNBase,
    )
    found = []
    for name, m in model.named_modules():
        if isinstance(m, kinds) and not getattr(m, "batch_first", True):
            found.append(f"{name or '<root>'} ({type(m).__name__})")
    return found


def shared_batch_statistics(model: nn.Module) -> list[str]:
    """Norm layers that stay shared and normalize with (or track) statistics over the batch in the
    current mode. In a batched pass they would see all T task chunks at once, so their outputs,
    gradients and running statistics would differ from T task passes."""
    from mtnorm.norm.batchnorm import TaskNorm

    found = []
    for name, m in model.named_modules():
        if isinstance(m, TaskNorm) or not isinstance(getattr(m, "running_mean", None), torch.Tensor):
            continue
        if not hasattr(m, "momentum"):
            continue  # running statistics but no momentum: frozen (FrozenBatchNorm2d), batch-free
        tracks = bool(getattr(m, "track_running_stats", True))
        is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
        if (m.training and tracks) or (is_bn and not tracks):
            found.append(f"{name or '<root>'} ({type(m).__module__}.{type(m).__qualname__})")
    return found


BATCHED_MIN_TASKS = 3
"""``mode="auto"`` never batches fewer tasks (measured: at T=2 batching gains nothing on CPU)."""

BATCHED_MAX_BATCH = 16
"""``mode="auto"`` batches only small per-task batches B: the gain comes from the per-pass overhead
and the inefficiency of small convolutions that T passes of a small batch pay."""

BATCHED_MAX_ELEMENTS = 2**20
"""``mode="auto"`` batches only while the repeated input ``T * x.numel()`` stays within this many
elements (T·B <= 341 for 3x32x32 images); beyond it the activations of the batched pass are so
large that T passes of batch B were measured faster."""


def choose_mode(model: nn.Module, x: Any, num_tasks: int, batch_dim: int | None = None) -> str:
    """The execution strategy that ``mode="auto"`` picks (see :func:`forward_tasks`).

    Correctness first: ``"sequential"`` whenever a batched pass could differ from T task passes or
    could split the wrong dimension:

    * the model holds a shared norm layer that uses batch statistics in the current mode (an
      unconverted BatchNorm or subclass in training, :func:`shared_batch_statistics`);
    * the model holds sequence-first modules (:func:`sequence_first_modules`) and ``batch_dim``
      was not given, so dim 0 may not be the batch.

    * a module declares ``mtnorm_batched = False`` (the architectures of :mod:`mtnorm.arch`).

    Then speed, on CPU: ``"batched"`` when ``T >= 3``, the per-task batch ``B <= 16`` and the input
    repeated T times has at most ``2**20`` elements (``T * x.numel()``; T·B <= 341 for 3x32x32
    images), otherwise ``"sequential"``.

    Measured with ``benchmarks/bench_norm.py`` (CPU time on 1 thread, and wall time on 2 threads;
    converted 7-conv ResNet of width 32 on 32x32 inputs, forward + backward, see
    docs/benchmarks.md). Time of T ``use_task`` passes divided by the time of the batched pass
    (CPU time):

    * B = 8: 1.12x-1.14x (T=3), 1.36x-1.38x (T=10), 1.15x-1.33x (T=40) over two runs; on 2
      threads (wall time) 1.65x (T=10) and 1.4x-1.8x (T=40). Small per-task batches are where
      batching pays.
    * B = 32: 1.04x (T=3), 0.93x-0.97x (T=10), 0.68x (T=40); B = 16, T=40: 0.93x; B = 128, T=3:
      0.90x. Once the repeated batch is large, the batched pass is no faster than the unconverted
      model on the same T·B batch (its activations are tens of MB per layer), while T passes of
      batch B stay in cache. The size bound is on elements rather than on T·B so that it scales
      with the input's resolution.
    * T = 2: 0.97x-1.02x at B = 8 and 32, so two tasks stay sequential.

    With this rule ``auto`` is never slower than the loop beyond noise (0.98x-1.01x where it picks
    sequential) and 1.15x-1.4x faster where it batches. The batched pass costs 0.95x-1.34x of the
    *unconverted* model's single pass on T·B samples, which bounds what batching can save. On
    CUDA (not measured here), where one large launch beats many small ones, batched from
    ``T >= 4``.
    """
    if shared_batch_statistics(model):
        return "sequential"
    if any(getattr(m, "mtnorm_batched", True) is False for m in model.modules()):
        return "sequential"  # a module that computes its tasks jointly (mtnorm.arch)
    if batch_dim is None and sequence_first_modules(model):
        return "sequential"
    device = _device_of(model)
    if device.type == "cuda":
        return "batched" if num_tasks >= 4 else "sequential"
    if (
        num_tasks >= BATCHED_MIN_TASKS
        and _batch_size(x, batch_dim or 0) <= BATCHED_MAX_BATCH
        and num_tasks * _numel(x) <= BATCHED_MAX_ELEMENTS
    ):
        return "batched"
    return "sequential"


def _first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor in ``x`` (a tensor, or nested tuples, lists, dicts), or None."""
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        found = _first_tensor(v)
        if found is not None:
            return found
    return None


def _numel(x: Any) -> int:
    t = _first_tensor(x)
    return 1 if t is None else t.numel()


def _batch_size(x: Any, dim: int = 0) -> int:
    t = _first_tensor(x)
    return 1 if t is None or t.dim() <= dim else t.shape[dim]


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward_tasks(
    model: nn.Module,
    *args: Any,
    mode: str = "auto",
    tasks: Sequence[str] | None = None,
    batch_dim: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run every task of ``model`` on the same inputs; returns ``{task: output}``.

    ``forward_tasks(model, x)`` calls ``model(x)``; any positional and keyword inputs are passed
    on (``forward_tasks(bert, input_ids=ids, attention_mask=mask)``). ``mode``, ``tasks`` and
    ``batch_dim`` are this function's own keywords.

    Modes:

    * ``"sequential"``: T ``use_task`` passes of batch B, T separate autograd graphs. Each task's
      loss then reaches only its own graph, so per-task gradients cost one ordinary backward.
    * ``"batched"``: ONE call on the inputs repeated T times along the batch dimension: every
      tensor argument (positional or keyword, nested in tuples, lists, dicts) whose size along
      ``batch_dim`` equals the batch size of the first tensor argument is repeated; other values
      (broadcasting masks, scalars, options) pass unchanged. Every task-specific norm layer
      normalizes each task's chunk with that task's statistics and parameters. Outputs are split
      back per task along ``batch_dim``, keeping the model's container types (namedtuples,
      OrderedDict, transformers' ``ModelOutput``), unless the model returns :class:`PerTask`.
    * ``"auto"``: whichever :func:`choose_mode` picks; it never batches when a batched pass could
      differ from T passes (shared batch-statistics layers in training) or when the batch
      dimension is uncertain (sequence-first modules and no ``batch_dim``).

    ``batch_dim``: where the batch is (default 0; e.g. 1 for sequence-first ``[S, N, E]`` inputs
    of ``nn.TransformerEncoder``). Batch norms always normalize over dim 0, so a batched pass with
    ``batch_dim != 0`` supports layer norms, RMS norms and heads only.

    Modes agree: outputs, gradients and running-statistic updates are those of T sequential passes
    (tested). The documented differences (docs/modes.md): DW-BN in training (its batched pass mixes
    every task's *batch* statistics), and an explicit ``mode="batched"`` on a model with shared
    batch-statistics layers in training, which is refused with an error naming the layer.

    A model without task-specific norm layers (hard parameter sharing with :class:`TaskHeads`)
    runs once and must return a dict keyed by task.
    """
    all_tasks = tasks_of(model)
    if tasks is not None:
        unknown = [t for t in tasks if t not in all_tasks]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; this model's tasks are {list(all_tasks)}")
        if tuple(tasks) != all_tasks and mode == "batched":
            raise ValueError("mode='batched' runs all tasks; use mode='sequential' for a subset")
    run = tuple(tasks) if tasks is not None else all_tasks

    if not has_task_norms(model):
        out = model(*args, **kwargs)
        if not isinstance(out, dict):
            raise TypeError(
                "a model without task-specific norms must return a dict keyed by task "
                "(use mtnorm.TaskHeads for the heads)"
            )
        return {t: out[t] for t in run}

    if mode == "auto":
        inputs = (args, kwargs)
        mode = choose_mode(model, inputs, len(run), batch_dim) if run == all_tasks else "sequential"
    if mode == "sequential":
        outputs = {}
        for task in run:
            with use_task(model, task):
                out = model(*args, **kwargs)
            outputs[task] = out[task] if isinstance(out, PerTask) else out
        return outputs
    if mode == "batched":
        shared = shared_batch_statistics(model)
        if shared:
            raise ValueError(
                f"mode='batched' would normalize the shared layer {shared[0]} over all tasks' chunks "
                "at once, so results would differ from task passes; convert that layer (see "
                "mtnorm.register_norm), call model.eval(), or use mode='sequential' / 'auto'"
            )
        dim = batch_dim or 0
        batch = _batch_size((args, kwargs), dim)
        t = len(all_tasks)
        with batched_tasks(model, dim):
            out = model(*_repeat_input(args, t, dim, batch), **_repeat_input(kwargs, t, dim, batch))
        if isinstance(out, PerTask):
            return {task: out[task] for task in all_tasks}
        return dict(zip(all_tasks, _split_output(out, t, dim)))
    raise ValueError(f"unknown mode {mode!r}; choose 'auto', 'sequential' or 'batched'")


class TaskHeads(TaskRouted):
    """One head per task, routed like the task-specific norms.

    * a task chosen (``use_task``): applies that task's head and returns ``PerTask({task: y})``;
    * batched: applies head t to chunk t and returns ``PerTask`` of all tasks;
    * no task chosen: applies every head to the same features (hard parameter sharing) and returns
      ``PerTask`` of all tasks.

    Heads may have different output shapes; :func:`forward_tasks` hands the ``PerTask`` through.
    """

    def __init__(self, heads: dict[str, nn.Module]) -> None:
        super().__init__(list(heads))
        self.heads = nn.ModuleDict(heads)
        for p in self.heads.parameters():
            p._mtnorm_task_specific = True  # type: ignore[attr-defined]

    def forward(self, z: torch.Tensor) -> PerTask:
        if torch.compiler.is_compiling():
            # choosing a head module is Python control flow on the task: under torch.compile the
            # heads run eagerly after the (one, task-independent) compiled trunk
            return self._eager_heads(z)
        return self._heads(z)

    def _heads(self, z: torch.Tensor) -> PerTask:
        route = self.route
        if route is None:
            return PerTask({t: self.heads[t](z) for t in self.tasks})
        if route == BATCHED:
            chunks = z.chunk(self.num_tasks, dim=self.batch_dim)
            return PerTask({t: self.heads[t](c) for t, c in zip(self.tasks, chunks)})
        task = self.tasks[route]
        return PerTask({task: self.heads[task](z)})

    @torch.compiler.disable
    def _eager_heads(self, z: torch.Tensor) -> PerTask:
        return self._heads(z)

    def extra_repr(self) -> str:
        return ""
