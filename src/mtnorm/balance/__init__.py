"""Loss and gradient balancing for multi-task learning.

>>> balancer = mtnorm.balance.get("db_mtl")
>>> stats = balancer.backward(losses, mtnorm.shared_parameters(model))
>>> optimizer.step()

Every method is a :class:`Balancer`: ``aggregate(G, l)`` maps per-task gradients ``G``
(``T x P``) and losses ``l`` to one direction; ``backward(losses, shared)`` does the same on a
model and writes ``.grad``. See ``docs/balance.md``.
"""

from mtnorm.balance.base import Balancer, Combination, Diagnostics, LossWeighting, NonFiniteError
from mtnorm.balance.db_mtl import DBMTL, LogLosses, MaxNorm
from mtnorm.balance.gradient import (
    IMTLG,
    MGDA,
    AlignedMTL,
    CAGrad,
    FairGrad,
    GradNorm,
    GradVac,
    NashMTL,
    PCGrad,
    UPGrad,
)
from mtnorm.balance.grads import task_gradients
from mtnorm.balance.loss_weighting import DWA, EW, FAMO, GLS, IMTLL, RLW, UW, LogTransform
from mtnorm.balance.registry import available, get, register

__all__ = [
    "DBMTL",
    "DWA",
    "EW",
    "FAMO",
    "GLS",
    "IMTLG",
    "IMTLL",
    "MGDA",
    "RLW",
    "UW",
    "AlignedMTL",
    "Balancer",
    "CAGrad",
    "Combination",
    "Diagnostics",
    "FairGrad",
    "GradNorm",
    "GradVac",
    "LogLosses",
    "LogTransform",
    "LossWeighting",
    "MaxNorm",
    "NashMTL",
    "NonFiniteError",
    "PCGrad",
    "UPGrad",
    "available",
    "get",
    "register",
    "task_gradients",
]
