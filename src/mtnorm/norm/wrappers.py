"""Task norms inside the shapes third-party norm classes come in.

Some libraries fuse a norm with what surrounds it: timm's ``BatchNormAct2d`` is batch norm, dropout
and activation in one module; torchvision's and timm's ``LayerNorm2d`` normalize the channels of
``[N, C, H, W]`` by permuting to channels-last and back. :class:`TaskNormWrapper` keeps the
surrounding parts shared and makes only the norm task-specific, and :meth:`to_standard` rebuilds
the original class (kept as a template) with the task's values, so ``extract`` gives back the
model's own class.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mtnorm.norm.batchnorm import TaskNorm


def into_template(template: nn.Module, standard: nn.Module) -> nn.Module:
    """A copy of ``template`` (the original norm module) holding the values of ``standard`` (the
    torch-standard layer a task norm exports: BatchNorm, LayerNorm or RMSNorm)."""
    out = copy.deepcopy(template)
    own = out.state_dict()
    values = {k: v for k, v in standard.state_dict().items() if k in own}
    missing = [k for k in own if k not in values and "." not in k]
    if missing:
        raise TypeError(
            f"cannot rebuild {type(template).__qualname__}: its {missing} have no counterpart in the "
            f"exported {type(standard).__name__}; register a converter with its own export"
        )
    ref = next(iter(values.values()), None)
    if ref is not None:
        out.to(device=ref.device)
    with torch.no_grad():
        for key, value in values.items():
            own[key].copy_(value)
    return out.train(standard.training)


class TaskNormWrapper(nn.Module):
    """``post(norm(pre(x)))`` with a task-specific ``norm`` and shared surroundings.

    Args:
        norm: the task-specific norm.
        channels_first: permute ``[N, C, *S]`` to channels-last around ``norm`` (LayerNorm2d).
        drop, act: applied after the norm, in this order (timm's ``BatchNormAct2d``); shared.
        template: the original module, rebuilt by :meth:`to_standard`.
    """

    def __init__(
        self,
        norm: TaskNorm,
        template: nn.Module,
        channels_first: bool = False,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.norm = norm
        self.channels_first = channels_first
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()
        object.__setattr__(self, "_mtnorm_template", copy.deepcopy(template))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            dims = list(range(x.dim()))
            x = x.permute(0, *dims[2:], 1)
            x = self.norm(x)
            x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        else:
            x = self.norm(x)
        return self.act(self.drop(x))

    def to_standard(self, task: str) -> nn.Module:
        out = into_template(self._mtnorm_template, self.norm.to_standard(task))
        for part in ("drop", "act"):
            if isinstance(getattr(out, part, None), nn.Module):
                setattr(out, part, copy.deepcopy(getattr(self, part)))
        return out

    def extra_repr(self) -> str:
        return f"like {type(self._mtnorm_template).__qualname__}, channels_first={self.channels_first}"
