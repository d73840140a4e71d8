"""DSelect-k (Hazimeh et al., "DSelect-k: Differentiable selection in the mixture of experts with
applications to multi-task learning", NeurIPS 2021): MMoE with sparse, differentiable gates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtnorm.arch.experts import MixtureOfExperts, build_mixture, check_count, parse_options
from mtnorm.models.methods import BackboneFactory, register_method

DSELECT_K_DEFAULTS: dict[str, Any] = {
    "experts": 4,
    "k": 2,
    "gamma": 1.0,
    "entropy_reg": 0.0,
    "gate_input": "flatten",
    "gate_pool": 4,
    "norm": None,
}
"""Options of ``dselect_k`` (``method_kwargs``)."""

_EPS = 1e-12


def smooth_step(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """The smooth-step function of DSelect-k:

        S(z) = 0                                     for z <= -gamma/2
             = -2/gamma^3 z^3 + 3/(2 gamma) z + 1/2   for -gamma/2 < z < gamma/2
             = 1                                     for z >= gamma/2

    continuously differentiable (``S' = 0`` at ``+-gamma/2``), and exactly 0 or 1 outside the
    interval, which is what makes the selection sparse. Computed as the cubic of ``z`` clamped to
    ``[-gamma/2, gamma/2]``, so the gradient vanishes outside, and set to exactly 0 and 1 there.
    """
    t = z.clamp(-gamma / 2, gamma / 2)
    cubic = (-2.0 / gamma**3) * t**3 + (1.5 / gamma) * t + 0.5
    # exactly 0 and 1 at the flat ends (the cubic is, up to rounding): sparse weights are zeros
    return torch.where(z <= -gamma / 2, 0.0, torch.where(z >= gamma / 2, 1.0, cubic))


def binary_codes(bits: int) -> torch.Tensor:
    """``[2^bits, bits]``: row c is the binary encoding of c (least significant bit first)."""
    codes = torch.arange(2**bits).unsqueeze(1)
    return ((codes >> torch.arange(bits)) & 1).to(torch.get_default_dtype())


def fold_codes(num_experts: int) -> torch.Tensor:
    """``[2^m, E]`` 0/1 matrix sending code c to expert c, or to ``c - 2^(m-1)`` for ``c >= E``
    (``m = ceil(log2 E)``; ``E > 2^(m-1)`` so that expert exists)."""
    bits = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
    target = [c if c < num_experts else c - 2 ** (bits - 1) for c in range(2**bits)]
    return torch.nn.functional.one_hot(torch.tensor(target), num_experts).to(torch.get_default_dtype())


class DSelectKGate(nn.Module):
    """The per-example DSelect-k gate over ``E`` experts with ``k`` selectors.

    With ``m = ceil(log2 E)`` bits, selector ``i`` has logits ``z_i(x) = Z_i phi(x) + c_i`` in
    ``R^m`` and puts on code ``c`` (an ``m``-bit word) the probability

        r_i(x)_c = prod_j ( S(z_ij) if bit_j(c) = 1 else 1 - S(z_ij) ),

    a distribution over the ``2^m`` codes that is one-hot once every ``S(z_ij)`` is 0 or 1. The
    selectors are mixed by ``alpha(x) = softmax(A phi(x) + a)`` over ``k``; the gate is
    ``g(x) = sum_i alpha_i(x) r_i(x)``: a distribution over the experts with at most ``k``
    non-zero weights once the selectors are binary.

    ``E`` not a power of 2: codes ``c >= E`` stand for no expert. The authors' implementation keeps
    them and adds a penalty to the loss that grows with the selectors' mass on them (as recalled
    here, ``mean(1 / sum_{c<E} r_c)``); here code
    ``c >= E`` is folded onto expert ``c - 2^(m-1)`` (:func:`fold_codes`): the gate stays a
    distribution over existing experts without any extra loss, and a binary selector still picks
    exactly one expert. (The folded experts start with twice the others' prior weight.)

    Initialization: ``Z``, ``c`` uniform in ``[-gamma/100, gamma/100]`` (small logits), so that
    every ``S`` starts near 1/2, far from its flat ends (a saturated bit has no gradient); ``A`` as
    a default ``nn.Linear``.

    :meth:`entropy` is the paper's entropy regularizer ``sum_i H(r_i(x))``, averaged over the
    batch, which drives the selectors to binary codes.
    """

    def __init__(self, in_features: int, num_experts: int, k: int = 2, gamma: float = 1.0) -> None:
        super().__init__()
        self.num_experts, self.k, self.gamma = num_experts, k, float(gamma)
        self.bits = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
        self.z = nn.Linear(in_features, k * self.bits) if self.bits else None
        if self.z is not None:
            nn.init.uniform_(self.z.weight, -self.gamma / 100, self.gamma / 100)
            nn.init.uniform_(self.z.bias, -self.gamma / 100, self.gamma / 100)
        self.alpha = nn.Linear(in_features, k)
        self.register_buffer("codes", binary_codes(self.bits), persistent=False)
        self.register_buffer("fold", fold_codes(num_experts), persistent=False)

    def selectors(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, k, E]``: every selector's distribution over the experts (codes folded)."""
        batch = features.shape[0]
        if self.z is None:  # one expert: every selector picks it
            return features.new_ones(batch, self.k, 1)
        s = smooth_step(self.z(features).view(batch, self.k, 1, self.bits), self.gamma)
        per_bit = self.codes * s + (1 - self.codes) * (1 - s)  # [B, k, 2^m, m]
        return per_bit.prod(dim=-1) @ self.fold  # [B, k, E]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Weights ``[B, E]``: non-negative, rows sum to 1, at most ``k`` non-zero once converged."""
        alpha = torch.softmax(self.alpha(features), dim=-1)
        return (alpha.unsqueeze(-1) * self.selectors(features)).sum(dim=1)

    def entropy(self, features: torch.Tensor) -> torch.Tensor:
        """``mean_b sum_i H(r_i(x_b))`` (nats): 0 exactly when every selector is one-hot."""
        r = self.selectors(features)
        return -(r * (r + _EPS).log()).sum(dim=(1, 2)).mean()

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, k={self.k}, gamma={self.gamma}"


class DSelectK(MixtureOfExperts):
    """MMoE with DSelect-k gates: each task's gate selects (at most) ``k`` of the ``E`` experts.

    ``y_t = head_t( sum_e g_{t,e}(x) f_e(x) )`` with ``g_t`` a :class:`DSelectKGate`; experts
    are fresh backbones (shared), gate t is task t's own (``TaskModules``).

    Choices: ``experts=4`` (a power of 2, two bits per selector) and ``k=2`` so that each task
    mixes half of the experts once converged; ``gamma=1`` (the smooth step's width; larger gamma
    keeps the selectors soft longer). ``norm`` as for MMoE.

    Entropy regularization (the paper's, on every task's gate): with ``entropy_reg = lambda > 0``,
    :meth:`task_penalties` gives ``p_t(x) = lambda * H_t(x)`` (``H_t`` = :meth:`DSelectKGate.entropy`
    of task t's gate) and the trainer adds ``p_t`` to task t's training loss, so equal weighting
    minimizes ``sum_t (l_t + lambda H_t)``, the paper's objective. ``p_t`` reaches only gate t's
    parameters (``phi`` has none). The default ``entropy_reg=0`` adds nothing: the selectors then
    become sparse only where the task losses drive the smooth steps to their flat ends. The
    penalties recompute the gates from ``phi(x)`` (cheap: no expert runs) rather than keep tensors
    of the last forward on the module. :meth:`regularization` is their sum, for custom loops.
    """

    entropy_reg: float = 0.0

    def task_penalties(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{t: entropy_reg * H_t(x)}`` for every task; empty when ``entropy_reg`` is 0."""
        if self.entropy_reg == 0:
            return {}
        phi = self.features(x)
        return {t: self.entropy_reg * self.gates[t].entropy(phi) for t in self.tasks}

    def regularization(self, x: torch.Tensor) -> torch.Tensor:
        """``entropy_reg * sum_t H_t(x)``: the sum of :meth:`task_penalties` (0 when there are none)."""
        penalties = self.task_penalties(x)
        if not penalties:
            return x.new_zeros(())
        return torch.stack(list(penalties.values())).sum()


@register_method(
    "dselect_k",
    "DSelect-k: mixture of experts with differentiable sparse gates per task",
    needs_example_input=True,
)
def build_dselect_k(
    backbone_factory: BackboneFactory,
    tasks: Sequence[str],
    heads: Mapping[str, nn.Module],
    *,
    example_input: torch.Tensor,
    **options: Any,
) -> DSelectK:
    """DSelect-k on ``backbone_factory``'s backbones; options in :data:`DSELECT_K_DEFAULTS`."""
    opts = parse_options("dselect_k", options, DSELECT_K_DEFAULTS)
    count = check_count("dselect_k", "experts", opts["experts"])
    k = check_count("dselect_k", "k", opts["k"])
    gamma = opts["gamma"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
        raise ValueError(f"method 'dselect_k': gamma must be a positive number, got {gamma!r}")
    if not isinstance(opts["entropy_reg"], (int, float)) or opts["entropy_reg"] < 0:
        raise ValueError(f"method 'dselect_k': entropy_reg must be >= 0, got {opts['entropy_reg']!r}")
    if k > count:
        raise ValueError(f"method 'dselect_k': k={k} selectors for {count} experts; choose k <= experts")

    def gate(size: int, experts: int) -> DSelectKGate:
        return DSelectKGate(size, experts, k, gamma)

    model = build_mixture(DSelectK, "dselect_k", backbone_factory, tasks, heads, example_input, opts, gate)
    model.entropy_reg = float(opts["entropy_reg"])
    return model
