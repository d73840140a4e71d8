"""MMoE: multi-gate mixture-of-experts (Ma et al., "Modeling task relationships in multi-task
learning with multi-gate mixture-of-experts", KDD 2018)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.arch.experts import MixtureOfExperts, SoftmaxGate, build_mixture, parse_options
from mtnorm.models.methods import BackboneFactory, register_method

MMOE_DEFAULTS: dict[str, Any] = {"experts": 3, "gate_input": "flatten", "gate_pool": 4, "norm": None}
"""Options of ``mmoe`` (``method_kwargs``)."""


class MMoE(MixtureOfExperts):
    """Multi-gate mixture-of-experts: E shared experts, one softmax gate per task.

    ``y_t = head_t( sum_e g_{t,e}(x) f_e(x) )``, ``g_t(x) = softmax(W_t phi(x) + b_t)``, where
    every expert ``f_e`` is a fresh copy of the whole backbone and ``phi`` is the gates' view of
    the input (:class:`~mtnorm.arch.experts.GateFeatures`).

    Choices:

    * ``experts=3``: as many as the dense benchmarks have tasks (scenes, NYUv2), so that each task
      can come to rely on an expert of its own while the gates can still share; an expert is a
      whole backbone, so parameters and compute grow as ``E`` backbones (``E = T`` costs what STL
      costs). Fewer experts than tasks forces sharing; more mostly adds cost.
    * ``gate_input="flatten"``: the gates read the flattened input, the paper's ``softmax(W x)``
      and LibMTL's choice for images; ``"pool"`` reads it average-pooled to ``gate_pool`` x
      ``gate_pool`` cells instead (cheaper for large inputs).
    * Partition: experts shared, gate t task t's own (a ``TaskModules``); heads task-specific.
    * ``norm``: ``None`` keeps the experts' BatchNorms shared; ``"sigma"`` etc. converts them
      (MMoE + TSσBN), the model then runs once per task.
    """


@register_method(
    "mmoe", "multi-gate mixture-of-experts (MMoE): softmax gates per task", needs_example_input=True
)
def build_mmoe(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> MMoE:
    """MMoE on ``backbone_factory``'s backbones; options in :data:`MMOE_DEFAULTS`."""
    opts = parse_options("mmoe", options, MMOE_DEFAULTS)
    return build_mixture(MMoE, "mmoe", backbone_factory, tasks, heads, example_input, opts, SoftmaxGate)
