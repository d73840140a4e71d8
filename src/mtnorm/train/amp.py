"""Mixed precision: the autocast context for a precision and a dynamic fp16 loss scale.

bf16 has fp32's exponent range and needs no scaling; fp16 does. ``torch.amp.GradScaler`` unscales
``.grad`` *after* backward, which is too late for balancers, which combine per-task gradients
inside their backward. :class:`LossScale` keeps GradScaler's policy (start at 2**16, halve and
skip the step on overflow, double after ``growth_interval`` clean steps) while the unscaling itself
happens per gradient, in :class:`~mtnorm.train.gradients.GradientTransform`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``precision`` on ``device`` (a no-op context for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class LossScale:
    """Dynamic loss scale for fp16 (disabled, scale 1, for other precisions)."""

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0
        self.skipped = 0

    def update(self, overflow: bool) -> None:
        """Record one step: back off on overflow, grow after enough clean steps."""
        if not self.enabled:
            return
        if overflow:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = state["scale"]
        self.good_steps = state["good_steps"]
        self.skipped = state["skipped"]
