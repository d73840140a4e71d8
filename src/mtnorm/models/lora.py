"""Shared low-rank adapters (LoRA) for the linear layers of a transformer backbone.

The paper's "TSσBN (r=16)" (Table 4, Swin-T on PascalContext) adds *task-generic* LoRA adapters of
rank 16 to a frozen backbone and makes only the normalization task-specific. Here that is two
calls, in either order::

    backbone = add_lora(timm_backbone("swin_tiny_patch4_window7_224", ...), rank=16)
    backbone = mtnorm.convert(backbone, tasks, norm="sigma")   # every LayerNorm -> task σLN

after which the trainable parameters are exactly: the LoRA factors ``lora_A``/``lora_B``
(**shared** by all tasks: they are not task-routed, :func:`mtnorm.shared_parameters` lists them),
the σLN gates and shifts (task-specific, :func:`mtnorm.task_parameters`), and whatever is added
afterwards (the task heads). Through :func:`mtnorm.models.build_method`::

    build_method("tssbn", lambda norm: add_lora(timm_backbone(...), 16), tasks, heads)

(``tssbn`` converts the backbone with ``norm="sigma"``, which turns LayerNorms into σLN).

:func:`merge_lora` folds every adapter into its base weight and puts the plain ``nn.Linear`` back,
for deployment (e.g. before :func:`mtnorm.extract`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mtnorm.norm.batchnorm import TaskNorm
from mtnorm.norm.registry import is_norm

DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
"""Name suffixes of the linears of timm's ViT / Swin blocks: attention ``qkv`` and ``proj``, MLP
``fc1`` and ``fc2``."""

Targets = Sequence[str] | str | Callable[[str, nn.Linear], bool]


class LoRALinear(nn.Module):
    r"""A frozen ``nn.Linear`` plus a trainable low-rank update.

    .. math:: y = \mathrm{base}(x) + \frac{\alpha}{r}\, B\, A\, \mathrm{dropout}(x)

    ``A`` (``lora_A``, ``[rank, in_features]``) starts Kaiming-uniform and ``B`` (``lora_B``,
    ``[out_features, rank]``) at zero, so a fresh adapter computes exactly what ``base`` computes.
    ``base.weight`` and ``base.bias`` are frozen (``requires_grad=False``); the flags they had are
    restored by :meth:`merged`. The adapter is one module used by every task: **shared**, not
    task-specific.

    The weight is deliberately not exposed as ``.weight``: code that reads a linear's weight
    directly (rather than calling it) would silently bypass the adapter, so it fails instead;
    the frozen weight is ``.base.weight``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        bias_grad = base.bias.requires_grad if base.bias is not None else False
        self._base_requires_grad = (w.requires_grad, bias_grad)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear (and loralib) do
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * update

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / rank) · B A``, the update in the shape of ``base.weight``."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base ``nn.Linear`` with the update folded into its weight (eval-mode equivalent:
        dropout is off at deployment); its ``requires_grad`` flags are those it had before wrapping."""
        self.base.weight.add_(self.delta_weight().to(self.base.weight.dtype))
        self.lora_B.zero_()  # the update now lives in the base weight: this module must not add it again
        self.base.weight.requires_grad_(self._base_requires_grad[0])
        if self.base.bias is not None:
            self.base.bias.requires_grad_(self._base_requires_grad[1])
        return self.base.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}"
        )


@dataclass
class LoRAReport:
    """What :func:`add_lora` did; kept on the model as ``model.mtnorm_lora_report``."""

    rank: int
    wrapped: list[str] = field(default_factory=list)  # qualified names of the wrapped linears
    lora_parameters: int = 0  # rank * (in + out), summed
    frozen: list[str] = field(default_factory=list)  # other parameters frozen by freeze_rest
    kept_norms: list[str] = field(default_factory=list)  # norm parameters left trainable

    def __str__(self) -> str:
        kinds = Counter(name.rsplit(".", 1)[-1] for name in self.wrapped)
        parts = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items()))
        return (
            f"LoRA rank {self.rank}: wrapped {len(self.wrapped)} linears ({parts}), "
            f"{self.lora_parameters} adapter parameters; froze {len(self.frozen)} other parameter "
            f"tensors, left {len(self.kept_norms)} norm parameter tensors trainable"
        )


def _matcher(targets: Targets) -> Callable[[str, nn.Linear], bool]:
    if callable(targets):
        return targets
    suffixes = (targets,) if isinstance(targets, str) else tuple(targets)
    if not suffixes or not all(isinstance(s, str) and s for s in suffixes):
        raise ValueError(f"targets must be non-empty name suffixes or a predicate, got {targets!r}")

    def match(name: str, _module: nn.Linear) -> bool:
        return any(name == s or name.endswith("." + s) for s in suffixes)

    return match


def add_lora(
    model: nn.Module,
    rank: int,
    targets: Targets = DEFAULT_TARGETS,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    freeze_rest: bool = True,
) -> nn.Module:
    """Wrap every matching ``nn.Linear`` of ``model`` in a :class:`LoRALinear`, in place.

    Args:
        model: any module (e.g. a timm ViT or Swin, before or after :func:`mtnorm.convert`).
        rank: the adapters' rank ``r`` (>= 1); the paper uses 16.
        targets: name suffixes matched against a linear's qualified name at dot boundaries
            (``"proj"`` matches ``blocks.0.attn.proj``, not ``attn.out_proj``), or a predicate
            ``(qualified_name, linear) -> bool``.
        alpha: the update is scaled by ``alpha / rank``; default ``rank`` (scale 1).
        dropout: dropout on the adapter's input (training only).
        freeze_rest: freeze every other parameter except those of normalization layers (shared
            norms, or task norms if ``model`` was converted already), so that after
            ``convert(..., norm="sigma")`` only the shared adapters and the task σLN are trainable
            (heads added afterwards are trainable as usual).

    Returns ``model`` itself (so it composes in a backbone factory); what was wrapped is in
    ``model.mtnorm_lora_report`` (:class:`LoRAReport`). The adapters are **shared** parameters:
    one per linear, used by every task.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"add_lora expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("add_lora replaces linears inside a model; wrap a lone nn.Linear with LoRALinear")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; add_lora applies once (merge_lora first)")
    match = _matcher(targets)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen = [(n, m) for n, m in linears if match(n, m)]
    if not chosen:
        seen = ", ".join(n for n, _ in linears) or "none"
        raise ValueError(f"add_lora: no nn.Linear matches targets {targets!r}; the linears are: {seen}")
    parents = dict(model.named_modules())
    for name, linear in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = parents[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            raise ValueError(
                f"add_lora: {name} belongs to nn.MultiheadAttention, which reads its weight directly "
                "and would bypass the adapter; target the model's own linears instead"
            )
        if _aliased(model, linear):
            raise ValueError(f"add_lora: {name} is shared under several names; wrap it by hand")
    report = LoRAReport(rank)
    for name, linear in chosen:
        parent_name, _, attr = name.rpartition(".")
        wrapped = LoRALinear(linear, rank, alpha, dropout)
        setattr(parents[parent_name], attr, wrapped)
        report.wrapped.append(name)
        report.lora_parameters += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    if freeze_rest:
        for mod_name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                continue
            norm = isinstance(module, TaskNorm) or is_norm(module)
            for p_name, p in module.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                if norm:
                    report.kept_norms.append(full)
                elif p.requires_grad:
                    p.requires_grad_(False)
                    report.frozen.append(full)
    model.mtnorm_lora_report = report
    return model


def _aliased(model: nn.Module, module: nn.Module) -> bool:
    """True when ``module`` is a child under more than one name (``named_modules`` lists it once)."""
    return sum(1 for _, m in model.named_modules(remove_duplicate=False) if m is module) > 1


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every :class:`LoRALinear` of ``model`` into its base linear and put that back, in place.

    Afterwards the model holds plain ``nn.Linear`` modules again (with the flags they had before
    :func:`add_lora`) and computes what it computed with the adapters, in eval mode, up to float
    rounding. Returns ``model`` (or the merged linear if ``model`` itself is a ``LoRALinear``).
    """
    if isinstance(model, LoRALinear):
        return model.merged()
    merged = 0
    for module in list(model.modules()):
        for child_name, child in list(module._modules.items()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
                merged += 1
    if not merged:
        raise ValueError("merge_lora: this model has no LoRA adapters")
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' ``lora_A`` and ``lora_B`` parameters (shared by all tasks)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
