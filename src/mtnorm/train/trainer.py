"""The trainer: builds a run from a :class:`~mtnorm.train.config.Config` and trains it.

One code path serves every method and balancer: the model comes from
:func:`mtnorm.models.build_method`, outputs from :func:`mtnorm.forward_tasks`, gradients from
either a plain ``sum(losses).backward()`` (equal weighting) or ``Balancer.backward``. Under
torchrun (:mod:`mtnorm.train.distributed`) equal weighting and loss weighting train on
DistributedDataParallel by default: one DDP forward of every task pass, then one ``.backward()``
of ``sum_t w_t l_t`` (``Balancer.weighted_objective``, weights from the loss values averaged over
processes); gradient balancers average their per-task gradients in one flat all-reduce
(``Balancer.backward(..., reduce=)``).

Resuming is exact: a checkpoint holds the model, optimizer, scheduler, balancer, loss scale, every
RNG state and the position (epoch, batch within the epoch). Batch order is a function of
(seed, epoch), so the resumed run sees the same batches and reaches bit-identical parameters on CPU.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtnorm import balance, metrics
from mtnorm.models.methods import build_method, count_parameters, default_norm_lr_mult
from mtnorm.norm import forward_tasks, param_groups, shared_parameters
from mtnorm.train import checkpoint as ckpt
from mtnorm.train import distributed as ddp
from mtnorm.train import runs
from mtnorm.train.amp import LossScale, autocast
from mtnorm.train.benchmarks import Benchmark, get_benchmark
from mtnorm.train.config import Config, ConfigError, to_dict
from mtnorm.train.gradients import GradientTransform, scale_grad
from mtnorm.train.loop import evaluate, num_batches, take, task_losses, train_batches
from mtnorm.train.losses import loss_for
from mtnorm.train.report import MetricsLogger, flatten

Callback = Callable[["Trainer"], None]


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. a non-finite loss); the message names the task and step."""


@dataclass
class RunResult:
    """What :meth:`Trainer.fit` returns."""

    status: str  # "finished" | "interrupted"
    epoch: int
    step: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    parameters: int = 0
    # training time of the run across every invocation that reached a checkpoint (a resumed run
    # counts the time up to the checkpoint it continued from, not the steps it redid after it)
    seconds: float = 0.0
    out: Path = Path(".")
    checkpoint: Path | None = None
    # the stop signal (SIGINT, SIGTERM) received during the run, if any; with status "finished" it
    # came after the last step (final evaluation or save), which then completed
    signal: int | None = None


def resolve_device(name: str) -> torch.device:
    """The configured device, with a clear error when it is not available here."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available; use device: cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} requested but MPS is not available; use device: cpu")
    return device


def make_balancer(name: str, tasks: Sequence[str], kwargs: dict[str, Any], seed: int) -> balance.Balancer:
    """``mtnorm.balance.get(name)``, given the tasks and the run's seed when the method takes them.

    Seeding random methods (RLW) from the run's seed keeps whole runs reproducible.
    """
    extras: dict[str, Any] = {"tasks": list(tasks), "seed": seed}
    extras = {k: v for k, v in extras.items() if k not in kwargs}
    while True:
        try:
            return balance.get(name, **kwargs, **extras)
        except TypeError as e:
            dropped = [k for k in extras if f"argument {k!r}" in str(e)]
            if not dropped:
                raise ConfigError(f"balancer_kwargs: {e}") from None
            extras.pop(dropped[0])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals that stop a run at the next step boundary with a checkpoint (Ctrl-C; schedulers,
``docker stop`` and torchrun send SIGTERM)."""


class _StopFlag:
    """SIGINT/SIGTERM handler: the first signal asks for a stop at the next step boundary, so the
    saved state is never half an optimizer step. Later signals are noted and ignored until that
    checkpoint is written: interrupting the step or the save would lose the consistent state the
    first signal asked for (SIGKILL still ends the process at once; resume then starts from the
    last checkpoint)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.signum: int | None = None
        self._log = log
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        else:
            self._log(f"{signal.Signals(signum).name} received; already stopping, saving the checkpoint")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def first_nonfinite(module: nn.Module) -> str | None:
    """The qualified name of the first parameter or buffer of ``module`` holding NaN or inf."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"{kind} {name!r}"
    return None


def grads_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every ``.grad`` of ``params`` is finite (one host sync, not one per tensor)."""
    checks = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    return not checks or bool(torch.stack(checks).all())


class Trainer:
    """Builds data, model, optimizer and balancer from ``cfg``; :meth:`fit` trains and evaluates.

    Args:
        cfg: the run's configuration.
        callbacks: functions called with the trainer after every optimizer step (logging hooks,
            tests that interrupt a run).
        log: where one-line progress messages go (``print`` by default; ``None`` for silence).
    """

    def __init__(
        self,
        cfg: Config,
        callbacks: Sequence[Callback] = (),
        log: Callable[[str], None] | None = print,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self._log = log or (lambda _msg: None)
        # data first: a missing dataset is the most likely problem and deserves the first word
        self.bench: Benchmark = get_benchmark(cfg)
        self.tasks = self.bench.tasks
        self.specs = self.bench.specs
        self.losses = {t: loss_for(spec) for t, spec in self.specs.items()}
        unknown = sorted(set(cfg.loss_weights) - set(self.tasks))
        if unknown:
            raise ConfigError(
                f"loss_weights: unknown task {', '.join(map(repr, unknown))}; "
                f"the tasks of {cfg.data.name!r} are {list(self.tasks)}"
            )
        self.loss_weights = {t: cfg.loss_weights.get(t, 1.0) for t in self.tasks}
        self.train_split, self.test_split = self.bench.load(cfg)

        self.device = resolve_device(cfg.device)
        self.world = ddp.init_from_env(self.device)
        if not self.world.is_main:
            self._log = lambda _msg: None  # one voice per run, not one per process
        ckpt.seed_everything(cfg.seed, cfg.deterministic, self.device)
        self.lower_is_better = metrics.lower_is_better_names([s.metric() for s in self.specs.values()])

        self.model = build_method(
            cfg.method,
            self._backbone_factory,
            self.tasks,
            self.bench.heads(),
            example_input=self.example_input(),
            **cfg.method_kwargs,
        ).to(self.device)
        if self.world.distributed:
            self.model = ddp.prepare_model(self.model, self.device)
        self.parameters = count_parameters(self.model)

        # STL shares nothing, so there is nothing to balance: its tasks just add up. EW with
        # options (log_losses, max_norm: DB-MTL's halves) is a balancer, not plain EW.
        balanced = cfg.balancer != "ew" or bool(cfg.balancer_kwargs)
        use_balancer = balanced and cfg.method != "stl"
        if cfg.method == "stl" and balanced:
            self._log(f"stl shares no parameters: balancer {cfg.balancer!r} has nothing to combine; unused")
        self.balancer = (
            make_balancer(cfg.balancer, self.tasks, cfg.balancer_kwargs, cfg.seed) if use_balancer else None
        )
        if self.balancer is not None:
            self.balancer.to(self.device)
        # Gradient balancers need every task's gradient: T separate task graphs give them for the
        # price of one backward, one batched graph would cost T (docs/balance.md), so "auto"
        # trains such a balancer with sequential task passes.
        needs_task_grads = self.balancer is not None and not isinstance(self.balancer, balance.LossWeighting)
        self.train_forward_mode = (
            "sequential" if cfg.forward_mode == "auto" and needs_task_grads else cfg.forward_mode
        )
        self.shared = shared_parameters(self.model)

        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.loss_scale = LossScale(cfg.precision == "fp16")
        # under torchrun: "ddp" (DDP's buckets during the one backward: equal and loss weighting),
        # "flat" (one all-reduce of the gradients, for gradient balancers of the per-task gradients
        # before they are combined) or "hooks" (one per parameter and task pass); see
        # mtnorm.train.distributed. requires_grads, not the class: log_losses over a loss
        # weighting is one weighted backward too
        combines_grads = self.balancer is not None and self.balancer.requires_grads
        self.grad_sync = self._resolve_grad_sync(combines_grads) if self.world.distributed else None
        self._ddp_forward: nn.Module | None = None
        if self.grad_sync == "ddp":
            from mtnorm.train import ddp_model

            self._ddp_forward = ddp_model.wrap(self.model, self.train_forward_mode, self.device)
        hook_reduce = ddp.average if self.grad_sync == "hooks" else None
        needs_hooks = self.loss_scale.enabled or hook_reduce is not None
        self.grad_transform = GradientTransform(self.model.parameters(), hook_reduce) if needs_hooks else None

        self.out = Path(cfg.out)
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.best_score = -math.inf
        self._seconds_before = 0.0  # training time of earlier invocations, restored on resume
        self._fit_start: float | None = None
        self.reference: dict[str, dict[str, float]] | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self.logger: MetricsLogger | None = None
        self._stop = _StopFlag(self._log)
        self._saved: dict[str, int] = {}  # checkpoint name -> epoch it was written at (this process)
        self._check_batch_size()

    # ------------------------------------------------------------------ construction
    def _resolve_grad_sync(self, combines_grads: bool) -> str:
        """The gradient sync of this run (:func:`mtnorm.train.distributed.resolve_grad_sync`), with
        a message when an explicit ``ddp`` cannot serve the balancer."""
        requested = ddp.grad_sync()
        chosen = ddp.resolve_grad_sync(requested, combines_grads)
        if requested == "ddp" and chosen != "ddp":
            self._log(
                f"MTNORM_GRAD_SYNC=ddp: equal and loss weighting only; balancer {self.cfg.balancer!r} "
                "combines per-task gradients, averaged before it combines them: it uses flat"
            )
        return chosen

    def _check_batch_size(self) -> None:
        """Refuse up front a run whose batches would hold a single sample per task and process.

        Batch statistics of one sample are undefined (PyTorch raises "Expected more than 1 value per
        channel when training"); a last partial batch of one sample would fail mid-epoch.
        """
        n = len(self.train_split)
        per_process = self.cfg.data.batch_size // self.world.size
        last = n % self.cfg.data.batch_size
        if per_process < 2 or last == 1 or n < 2:
            raise ConfigError(
                f"data.batch_size={self.cfg.data.batch_size} with {n} training samples"
                f"{f' on {self.world.size} processes' if self.world.size > 1 else ''} gives a batch of "
                "one sample, whose batch-norm statistics are undefined; choose a batch size >= 2 per "
                "process whose last batch (n_train % batch_size) is not 1"
            )

    def example_input(self) -> torch.Tensor:
        """Two training inputs, which size the modules of stage-wise architectures (build_method)."""
        return take(self.train_split, torch.arange(min(2, len(self.train_split))), torch.device("cpu"))[0]

    def _backbone_factory(self, norm: str) -> nn.Module:
        backbone = self.bench.backbone(norm)
        path = self.cfg.model.checkpoint
        if path:
            if not Path(path).is_file():
                raise ConfigError(
                    f"model.checkpoint: no file at {path} (pretrained weights are user-provided)"
                )
            load = getattr(backbone, "load_pretrained", None)
            if callable(load):  # e.g. a timm backbone: position embeddings resampled to the input size
                load(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                backbone.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        rank = self.cfg.model.lora_rank
        if rank is not None:  # after the weights load: the adapters rename the linears they wrap
            from mtnorm.models.lora import add_lora

            add_lora(backbone, rank)
        return backbone

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        alpha = o.norm_lr_mult
        if alpha is None:
            alpha = default_norm_lr_mult(self.cfg.method, self.cfg.method_kwargs)
        groups = param_groups(
            self.model,
            o.lr,
            norm_lr_mult=alpha,
            layernorm_lr_mult=o.layernorm_lr_mult,
            weight_decay=o.weight_decay,
        )
        if self.balancer is not None:
            extra = [p for p in self.balancer.parameters() if p.requires_grad]
            if extra:
                groups.append({"name": "balancer", "params": extra, "lr": o.lr, "weight_decay": 0.0})
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        return cls(groups, lr=o.lr)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        o = self.cfg.optim
        if o.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, o.step_size, o.gamma)
        if o.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, self.cfg.epochs)
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it stands."""
        return {
            "config": to_dict(self.cfg),
            "tasks": list(self.tasks),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "balancer": self.balancer.state_dict() if self.balancer is not None else None,
            "loss_scale": self.loss_scale.state_dict(),
            "rng": ckpt.rng_state(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "best_score": self.best_score,
            "reference": self.reference,
            "metrics": self.last_metrics,
            "parameters": self.parameters,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (RNG states included)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.balancer is not None and state["balancer"] is not None:
            self.balancer.load_state_dict(state["balancer"])
        self.loss_scale.load_state_dict(state["loss_scale"])
        ckpt.set_rng_state(state["rng"])
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.global_step = state["global_step"]
        self.best_score = state["best_score"]
        self.reference = state["reference"]
        self.last_metrics = state["metrics"]
        self._seconds_before = float(state.get("seconds", 0.0))  # older checkpoints lack it

    @property
    def seconds(self) -> float:
        """Training time of this run so far, in seconds, summed over the invocations it resumed."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._seconds_before + running

    def save(self, name: str = "last.pt") -> Path | None:
        """Write a checkpoint atomically into the run folder (main process only).

        A model holding a non-finite parameter or buffer is never saved (:meth:`check_finite`).
        """
        self.check_finite("saving")
        if not self.world.is_main:
            return None
        path = ckpt.save_atomic(self.state_dict(), self.out / name)
        self._saved[name] = self.epoch
        return path

    def _last_good(self) -> str:
        """A truthful sentence on which checkpoint survives in the run folder."""
        if "last.pt" in self._saved:
            return f"the last good checkpoint is {self.out / 'last.pt'} (epoch {self._saved['last.pt']})"
        if (self.out / "last.pt").is_file():
            return f"the last good checkpoint is {self.out / 'last.pt'} (written before this process)"
        return f"no checkpoint was written yet in {self.out}"

    def check_finite(self, before: str) -> None:
        """Raise :class:`TrainingError` naming the first non-finite parameter or buffer."""
        bad = first_nonfinite(self.model)
        if bad is not None:
            raise TrainingError(
                f"{bad} is not finite after step {self.global_step} (epoch {self.epoch}); stopped before "
                f"{before}, nothing broken was written; {self._last_good()}. Lower the learning rate "
                "(optim.lr, optim.norm_lr_mult) or check the data"
            )

    # ------------------------------------------------------------------ training
    def _global_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Give each loss the value of the global-batch mean, keeping its local gradient (one
        all-reduce of the T values).

        For the paths whose backward does not average the loss values itself (``hooks``; equal
        weighting on DDP): the finiteness check and the logs see the same, global, values on every
        rank, and on ``hooks`` a loss-based balancer weighs the tasks by the global batch's losses
        (by its own shard's, the replicas would drift apart).
        """
        values = torch.stack([l.detach() for l in losses.values()])
        torch.distributed.all_reduce(values)
        values /= self.world.size
        return {t: l + (v - l.detach()) for (t, l), v in zip(losses.items(), values)}

    def _check_losses(self, names: Sequence[str], values: torch.Tensor) -> None:
        bad = [t for t, v in zip(names, values.tolist()) if not math.isfinite(v)]
        if bad:
            raise TrainingError(
                f"non-finite loss for task {', '.join(map(repr, bad))} at step {self.global_step} "
                f"(epoch {self.epoch}); {self._last_good()}"
            )

    @property
    def _values_averaged_in_backward(self) -> bool:
        """Whether the step's backward averages the loss values over processes itself: the flat
        path (in its one collective), and loss weighting on DDP (before the weights)."""
        return self.grad_sync == "flat" or (self.grad_sync == "ddp" and self.balancer is not None)

    def train_step(self, index: torch.Tensor) -> dict[str, float]:
        """One optimizer step on the global batch ``index`` (this process's shard of it)."""
        cfg = self.cfg
        if self.world.distributed:
            index = ddp.shard(index, self.world)
        x, y = take(self.train_split, index, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, cfg.precision):
            if self._ddp_forward is not None:  # every task pass in one DDP forward
                out = self._ddp_forward(x)
            else:
                out = forward_tasks(self.model, x, mode=self.train_forward_mode)
        losses = task_losses(out, y, self.losses)
        # where the backward averages the loss values, these are this shard's until it does; the
        # finiteness check waits for the averaged values, so every process raises or none
        late = self._values_averaged_in_backward
        if self.world.distributed and not late:
            losses = self._global_losses(losses)
        names = list(losses)
        values = torch.stack([l.detach().reshape(()) for l in losses.values()])
        if not late:
            self._check_losses(names, values)
        if cfg.conflict_every and self.global_step % cfg.conflict_every == 0:
            self._record_conflict(losses)
        losses = self._add_task_penalties(losses, x)
        if any(w != 1.0 for w in self.loss_weights.values()):  # logged values stay unweighted
            losses = {t: l * self.loss_weights[t] for t, l in losses.items()}
        if self.grad_transform is not None:
            self.grad_transform.scale = self.loss_scale.scale
        if self.loss_scale.enabled:
            losses = {t: scale_grad(l, self.loss_scale.scale) for t, l in losses.items()}

        overflow = False
        try:
            names, values = self._backward(losses, names, values)
        except balance.NonFiniteError as e:
            # a non-finite loss ends the run; a non-finite gradient under fp16 is an overflow
            if e.kind == "loss" or not self.loss_scale.enabled:
                raise TrainingError(
                    f"{e} (epoch {self.epoch}, global step {self.global_step}); {self._last_good()}"
                ) from None
            overflow = True
        if self.loss_scale.enabled and not overflow:
            overflow = not grads_finite(self.model.parameters())
        if overflow:  # fp16 overflow: skip this step, retry later with a smaller scale
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.loss_scale.update(overflow)
        return dict(zip(names, values.tolist()))

    def _add_task_penalties(
        self, losses: dict[str, torch.Tensor], x: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``l_t + p_t`` for the model's task penalties (``model.task_penalties(x)``, e.g. DSelect-k's
        gate entropy): part of the task's loss for every balancer, absent from the logged values
        (on the paths that average the values during the backward, the logged value includes it)."""
        hook = getattr(self.model, "task_penalties", None)
        penalties = hook(x) if callable(hook) else {}
        unknown = set(penalties) - set(losses)
        if unknown:
            raise ValueError(
                f"model.task_penalties returned unknown tasks {sorted(unknown)}; the tasks are {list(losses)}"
            )
        return {t: l + penalties[t].to(l.dtype) if t in penalties else l for t, l in losses.items()}

    def _backward(
        self, losses: dict[str, torch.Tensor], names: list[str], values: torch.Tensor
    ) -> tuple[list[str], torch.Tensor]:
        """The step's gradients into ``.grad``, averaged over processes under torchrun; returns the
        (unweighted) loss values to log: ``values``, or the averaged ones where the backward
        averaged them (checked first: a non-finite one raises on every process)."""
        if self.balancer is None:
            # on DDP its buckets average the gradients during this backward
            torch.stack(list(losses.values())).sum().backward()
            if self.grad_sync == "flat":
                values = ddp.average_grads(self.model.parameters(), head=values)
                self._check_losses(names, values)
            return names, values
        if self._ddp_forward is not None:
            diag = self._ddp_weighted_backward(losses)
        else:
            reduce = ddp.average_flat_ if self.grad_sync == "flat" else None
            diag = self.balancer.backward(losses, self.shared, reduce=reduce)
        if not self._values_averaged_in_backward:
            return names, values
        # the averaged (weighted) losses, in the balancer's task order
        names = list(self.balancer.tasks)
        factors = torch.tensor([self.loss_weights[t] for t in names], dtype=values.dtype)
        return names, diag.losses.to(values) / factors.to(values.device)

    def _ddp_weighted_backward(self, losses: dict[str, torch.Tensor]) -> balance.Diagnostics:
        """Loss weighting on DDP: ``w`` from the T loss values averaged over processes (one small
        all-reduce: every rank computes the weights of the global batch, learned weights move as
        in one process), then ONE ``.backward()`` of ``L = sum_t w_t l_t`` (``w`` constant), whose
        gradients DDP's buckets average while it runs.

        The averaged gradient is the same on every rank; a non-finite one undoes the balancer's
        step (as ``Balancer.backward`` does) and raises :class:`~mtnorm.balance.NonFiniteError`, so
        every rank stops, or under fp16 skips the step, together.
        """
        snapshot = self.balancer.snapshot()
        objective, diag = self.balancer.weighted_objective(losses, reduce=ddp.average_flat_)
        objective.backward()
        if not grads_finite(self.model.parameters()):
            self.balancer.restore(snapshot)
            raise balance.NonFiniteError(
                f"non-finite gradient of the weighted loss sum_t w_t l_t at step {diag.step}; the step "
                "was not applied (DDP averaged the sum, which cannot tell the task; "
                "MTNORM_GRAD_SYNC=flat names it)"
            )
        return diag

    def _record_conflict(self, losses: dict[str, torch.Tensor]) -> None:
        """Per-filter cosines of the task gradients on the shared convolutions, appended to
        ``conflict.jsonl`` (main process; extra backward passes only at these steps)."""
        from mtnorm.analysis.conflict import conv_weights, filter_cosines, task_gradients

        params = conv_weights(self.shared)
        if not params or not self.world.is_main or len(losses) < 2:
            return
        import json

        record = {"step": self.global_step, "epoch": self.epoch}
        record["cosines"] = filter_cosines(task_gradients(losses, params))
        with open(self.out / "conflict.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics ``{task: {name: value}}`` of the current model on the test split (logged)."""
        self.check_finite("evaluating")
        results, losses = evaluate(
            self.model,
            self.test_split,
            self.specs,
            self.losses,
            self.cfg.data.eval_batch_size,
            self.device,
            lambda: autocast(self.device, self.cfg.precision),
            self.cfg.forward_mode,
        )
        if self.logger is not None:
            self.logger.log(
                "eval",
                self.global_step,
                {"epoch": self.epoch, **flatten(results), **{f"loss/{t}": v for t, v in losses.items()}},
            )
        return results

    def _score(self, results: dict[str, dict[str, float]]) -> float:
        """Higher is better: Δm% against the first evaluation of this run (scale-free across tasks)."""
        if self.reference is None:
            self.reference = results
        try:
            score = metrics.delta_m(results, self.reference, self.lower_is_better)
        except (ValueError, KeyError, ZeroDivisionError):
            return -math.inf
        return score if math.isfinite(score) else -math.inf

    def _progress(self, total: int, initial: int) -> Any:
        from tqdm.auto import tqdm

        enabled = self.cfg.progress if self.cfg.progress is not None else sys.stderr.isatty()
        return tqdm(
            total=total,
            initial=initial,
            disable=not enabled or not self.world.is_main,
            desc=f"{self.cfg.method} epoch {self.epoch + 1}/{self.cfg.epochs}",
            leave=False,
        )

    def fit(self, resume: bool | str | Path = False, overwrite: bool = False) -> RunResult:
        """Train for ``cfg.epochs`` epochs, evaluating on the test split; returns a :class:`RunResult`.

        The run folder ``cfg.out`` must not hold another run unless ``resume=True`` (continue from
        ``<out>/last.pt``; a path picks another checkpoint) or ``overwrite=True`` (delete the old
        run's files first). A resumed run must have the same config except :data:`RESUME_SAFE_KEYS
        <mtnorm.train.checkpoint.RESUME_SAFE_KEYS>`. SIGINT or SIGTERM (or a ``KeyboardInterrupt``
        from a callback) stop at the next step boundary, save ``last.pt`` and return with
        ``status="interrupted"``.
        """
        lock = runs.RunLock(self.out, self._log) if self.world.is_main else None
        if lock is not None:
            if not isinstance(resume, (str, Path)) or isinstance(resume, bool):
                runs.check_folder(self.out, bool(resume), overwrite)
            lock.acquire()
        try:
            if lock is not None and overwrite:
                runs.clear_run(self.out)
            if resume:
                self._resume(self.out / "last.pt" if isinstance(resume, bool) else Path(resume))
            return self._fit()
        finally:
            if lock is not None:
                lock.release()

    def _resume(self, path: Path) -> None:
        try:
            state = ckpt.load(path, self.device)
        except ckpt.CheckpointError as e:
            others = [p for p in (self.out / "last.pt", self.out / "best.pt") if p != path and p.is_file()]
            intact = [str(p) for p in others if ckpt.verify(p) is None]
            hint = f"; {', '.join(intact)} is intact" if intact else "; no other intact checkpoint here"
            raise ckpt.CheckpointError(f"{e}{hint}") from None
        changes = ckpt.config_changes(state.get("config", {}), to_dict(self.cfg))
        if changes:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
            raise ConfigError(
                f"--resume: the config differs from the checkpoint's in keys that change the run ({listed}). "
                f"Only {', '.join(ckpt.RESUME_SAFE_KEYS)} may change on resume; start a new run (another "
                "out, or --overwrite) to change the others"
            )
        self.load_state_dict(state)
        if self.world.is_main:
            _truncate_logs(self.out, self.global_step)
        self._log(f"resumed from {path} at epoch {self.epoch} batch {self.step_in_epoch}")

    def _fit(self) -> RunResult:
        cfg = self.cfg
        if self.world.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.logger = MetricsLogger(self.out, cfg.tensorboard)
        self._fit_start = time.perf_counter()
        batches = num_batches(len(self.train_split), cfg.data.batch_size)
        status = "finished"
        path: Path | None = None
        try:
            with self._stop:
                try:
                    while self.epoch < cfg.epochs:
                        self._run_epoch(batches)
                except KeyboardInterrupt:
                    status = "interrupted"
                    if self._stop.signum is None:
                        self._stop.signum = signal.SIGINT
                # the final save runs with the handlers still installed: a second signal cannot
                # interrupt it
                path = self.save()
            if status == "interrupted":
                self._log(
                    f"interrupted ({signal.Signals(self._stop.signum).name}) at epoch {self.epoch} batch "
                    f"{self.step_in_epoch}; checkpoint saved to {path}; continue with --resume"
                )
            else:
                if not self.last_metrics:
                    self.last_metrics = self.evaluate()
                if self._stop.signum is not None:
                    self._log(
                        f"{signal.Signals(self._stop.signum).name} received after the last step; the run "
                        f"finished and its checkpoint {path} is complete"
                    )
        finally:
            if self.logger is not None:
                self.logger.close()
            self._seconds_before, self._fit_start = self.seconds, None
        return RunResult(
            status,
            self.epoch,
            self.global_step,
            self.last_metrics,
            self.parameters,
            self.seconds,
            self.out,
            path,
            self._stop.signum,
        )

    def _stop_requested(self) -> bool:
        """Whether any process was asked to stop; under torchrun every rank agrees on the step, so no
        rank waits in a collective that the others never join."""
        if not self.world.distributed:
            return self._stop.requested
        flag = torch.tensor([float(self._stop.signum or 0)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self._stop.signum is None:
            self._stop.signum = int(flag.item())
        return bool(flag.item())

    def _run_epoch(self, batches: int) -> None:
        cfg = self.cfg
        # modules with a schedule over epochs (LTB's temperature and tree freezing); called again
        # on resume, so a resumed epoch runs under the same schedule
        for module in self.model.modules():
            if callable(getattr(module, "on_epoch_start", None)):
                module.on_epoch_start(self.epoch, cfg.epochs)
        self.model.train()
        with self._progress(batches, self.step_in_epoch) as bar:
            for b, index in train_batches(
                self.train_split, cfg.data.batch_size, cfg.seed, self.epoch, self.step_in_epoch
            ):
                if self._stop_requested():
                    raise KeyboardInterrupt
                losses = self.train_step(index)
                self.step_in_epoch = b + 1
                self.global_step += 1
                bar.update(1)
                if self.logger is not None and self.global_step % cfg.log_every == 0:
                    self.logger.log("train", self.global_step, {"epoch": self.epoch, **losses})
                if cfg.save_every and self.global_step % cfg.save_every == 0:
                    self.save()
                for callback in self.callbacks:
                    callback(self)
        if self.scheduler is not None:
            self.scheduler.step()
        self.epoch += 1
        self.step_in_epoch = 0
        if self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs:
            self.last_metrics = self.evaluate()
            score = self._score(self.last_metrics)
            # an undefined score (e.g. the F1 of a constant task) ranks lowest, but the first
            # evaluation always writes best.pt so a finished run has one
            if score > self.best_score or not (self.out / "best.pt").is_file():
                self.best_score = max(score, self.best_score)
                self.save("best.pt")
        self.save()


def _truncate_logs(folder: Path, step: int) -> None:
    """Drop log records written after the checkpoint a run resumes from, so the resumed run's
    records are not doubled (they are written again as the same steps are trained again)."""
    import csv
    import json

    # metrics.jsonl records a step after it ran (step <= the checkpoint's), conflict.jsonl before
    for name, keep in (("metrics.jsonl", lambda s: s <= step), ("conflict.jsonl", lambda s: s < step)):
        jsonl = folder / name
        if jsonl.is_file():
            lines = jsonl.read_text().splitlines()
            kept = [line for line in lines if line and keep(json.loads(line)["step"])]
            jsonl.write_text("".join(line + "\n" for line in kept))
    for name in ("train.csv", "eval.csv"):
        path = folder / name
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or "step" not in rows[0]:
            continue
        col = rows[0].index("step")
        rows = rows[:1] + [r for r in rows[1:] if int(r[col]) <= step]
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(rows)
