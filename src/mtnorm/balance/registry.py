"""Methods by name: ``get("db_mtl", beta=0.9)``, ``available()``."""

from __future__ import annotations

import inspect
from typing import Any

from mtnorm.balance import gradient, loss_weighting
from mtnorm.balance.base import Balancer
from mtnorm.balance.db_mtl import DBMTL, LogLosses, MaxNorm

_METHODS: dict[str, type[Balancer]] = {
    # loss-based
    "ew": loss_weighting.EW,
    "uw": loss_weighting.UW,
    "dwa": loss_weighting.DWA,
    "rlw": loss_weighting.RLW,
    "gls": loss_weighting.GLS,
    "imtl_l": loss_weighting.IMTLL,
    "log": loss_weighting.LogTransform,
    "famo": loss_weighting.FAMO,
    # gradient-based
    "db_mtl": DBMTL,
    "mgda": gradient.MGDA,
    "pcgrad": gradient.PCGrad,
    "gradvac": gradient.GradVac,
    "cagrad": gradient.CAGrad,
    "imtl_g": gradient.IMTLG,
    "nash_mtl": gradient.NashMTL,
    "aligned_mtl": gradient.AlignedMTL,
    "gradnorm": gradient.GradNorm,
    "upgrad": gradient.UPGrad,
    "fairgrad": gradient.FairGrad,
}


def available() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def register(name: str, cls: type[Balancer]) -> None:
    """Make a :class:`Balancer` subclass available to :func:`get` under ``name``."""
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise TypeError(f"{cls!r} is not a Balancer subclass")
    key = _canonical(name)
    if key in _METHODS and _METHODS[key] is not cls:
        raise ValueError(f"{key!r} is already registered to {_METHODS[key].__name__}")
    _METHODS[key] = cls


def get(
    name: str, *, log_losses: bool = False, max_norm: bool | dict[str, Any] = False, **kwargs: Any
) -> Balancer:
    """A new balancer by name (case and ``-``/``_`` do not matter), built with ``kwargs``.

    ``log_losses=True`` runs the method on ``log(l_t + eps)`` (:class:`LogLosses`, DB-MTL's loss
    half); ``max_norm=True`` (or a dict of :class:`MaxNorm` options: ``beta``, ``sigma``, ``eps``)
    follows a loss weighting with DB-MTL's gradient half. ``get("ew", log_losses=True,
    max_norm=True)`` is DB-MTL.

    Raises:
        KeyError: unknown name (the message lists the valid ones).
        TypeError: a keyword the method does not take (the message names it and the valid ones).
    """
    key = _canonical(name)
    if key not in _METHODS:
        raise KeyError(f"unknown balancing method {name!r}; available: {', '.join(available())}")
    cls = _METHODS[key]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    for kwarg in kwargs:
        if kwarg not in accepted:
            raise TypeError(
                f"{key} got an unexpected keyword argument {kwarg!r}; it accepts {accepted} "
                "plus log_losses and max_norm"
            )
    balancer = cls(**kwargs)
    if max_norm:
        if key == "db_mtl":
            raise ValueError("db_mtl already includes max_norm; set its beta/sigma directly")
        options = max_norm if isinstance(max_norm, dict) else {}
        unknown = set(options) - {"beta", "sigma", "eps"}
        if unknown:
            raise TypeError(f"max_norm got unexpected options {sorted(unknown)}; use beta, sigma, eps")
        balancer = MaxNorm(balancer, **options)
    if log_losses:
        if key in ("db_mtl", "log"):
            raise ValueError(f"{key} already applies the log transform")
        balancer = LogLosses(balancer)
    return balancer


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"method name must be a string, got {type(name).__name__}")
    return name.strip().lower().replace("-", "_")
