"""Split-level metric accumulators and the multi-task gain Δm.

Every accumulator follows ``reset()`` / ``update(pred, target)`` per batch / ``compute()`` at the
end, and keeps sums or counts (never per-batch means), so the result over a split does not depend
on how it was batched. ``higher_is_better`` maps each metric name returned by ``compute()`` to its
direction; :func:`lower_is_better_names` turns a set of accumulators into the argument Δm needs.

Δm (Maninis et al. 2019; Liu et al. 2019, MTAN), for a method m against a baseline B::

    Δm = 1/K Σ_k (-1)^δ_k (M_m,k - M_B,k) / M_B,k × 100

with δ_k = 1 when lower is better for term k. ``per="task"`` first averages the terms inside
each task, then over the T tasks (the TSσBN paper and LibMTL); ``per="metric"`` averages over all
K metric terms at once (Nash-MTL, FAMO).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import torch

Nested = Mapping[str, Mapping[str, float]]

__all__ = [
    "Accuracy",
    "BinaryF1",
    "DepthMetric",
    "MAE",
    "Metric",
    "MultiLabelF1",
    "NormalMetric",
    "SegmentationMetric",
    "average_metrics",
    "delta_m",
    "delta_m_over_seeds",
    "delta_m_terms",
    "kendall_w",
    "lower_is_better_names",
]


def _check_shapes(name: str, pred: torch.Tensor, target: torch.Tensor, expected: str) -> None:
    raise ValueError(
        f"{name}: pred shape {tuple(pred.shape)} and target shape {tuple(target.shape)} "
        f"do not fit; expected {expected}"
    )


class Metric:
    """Base accumulator: ``reset``, ``update(pred, target)``, ``compute() -> {name: float}``."""

    higher_is_better: dict[str, bool] = {}
    primary: str = ""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class SegmentationMetric(Metric):
    """mIoU and pixel accuracy from a confusion matrix accumulated with ``torch.bincount``.

    ``pred``: logits [B,C,H,W] or labels [B,H,W]; ``target``: labels [B,H,W], ``ignore_index``
    pixels skipped. IoU_c = n_cc / (Σ_j n_cj + Σ_i n_ic - n_cc); mIoU averages over classes that
    occur in prediction or target over the whole split (a class absent from both has undefined
    IoU and is left out, as in MTAN). Pixel accuracy = Σ_c n_cc / Σ n.
    """

    higher_is_better = {"miou": True, "pixel_acc": True}
    primary = "miou"

    def __init__(self, num_classes: int, ignore_index: int = -1) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        super().__init__()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            if pred.shape[0] != target.shape[0] or pred.shape[2:] != target.shape[1:]:
                _check_shapes("SegmentationMetric", pred, target, "[B,C,H,W] logits vs [B,H,W]")
            if pred.shape[1] != self.num_classes:
                _check_shapes("SegmentationMetric", pred, target, f"C = {self.num_classes}")
            pred = pred.argmax(1)
        elif pred.shape != target.shape:
            _check_shapes("SegmentationMetric", pred, target, "[B,H,W] labels vs [B,H,W]")
        pred, target = pred.detach().reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(
                f"SegmentationMetric: target labels must be in 0..{self.num_classes - 1} "
                f"or {self.ignore_index}, got {target.min().item()}..{target.max().item()}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(
                f"SegmentationMetric: predicted labels must be in 0..{self.num_classes - 1}, "
                f"got {pred.min().item()}..{pred.max().item()}"
            )
        idx = target * self.num_classes + pred
        self.confusion += torch.bincount(idx, minlength=self.num_classes**2).view_as(self.confusion)

    def iou(self) -> torch.Tensor:
        """Per-class IoU (NaN for classes absent from both prediction and target)."""
        conf = self.confusion.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def compute(self) -> dict[str, float]:
        total = self.confusion.sum().item()
        if total == 0:
            raise ValueError("SegmentationMetric: no labelled pixels seen")
        return {
            "miou": float(self.iou().nanmean()),
            "pixel_acc": self.confusion.diag().sum().item() / total,
        }


class DepthMetric(Metric):
    """Absolute and relative depth error over valid pixels of the whole split.

    abs_err = Σ|d̂ - d| / n, rel_err = Σ |d̂ - d| / d / n over pixels with d != ``invalid`` (0 by
    default: missing depth in NYUv2/Cityscapes, as in MTAN). ``pred`` and ``target`` [B,1,H,W].
    """

    higher_is_better = {"abs_err": False, "rel_err": False}
    primary = "abs_err"

    def __init__(self, invalid: float = 0.0) -> None:
        self.invalid = invalid
        super().__init__()

    def reset(self) -> None:
        self.abs_sum = 0.0
        self.rel_sum = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            _check_shapes("DepthMetric", pred, target, "equal shapes, e.g. [B,1,H,W]")
        pred, target = pred.detach().double().cpu(), target.double().cpu()
        valid = target != self.invalid
        err = (pred - target).abs()[valid]
        self.abs_sum += err.sum().item()
        self.rel_sum += (err / target[valid].abs()).sum().item()
        self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("DepthMetric: no valid depth pixels seen")
        return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


class NormalMetric(Metric):
    """Angular error of surface normals, in degrees, over all valid pixels of the split.

    ``pred`` and ``target`` [B,3,H,W]; the prediction is normalized to unit length, pixels whose
    target is the zero vector are invalid (MTAN). err = acos(clamp(n̂·n, -1, 1)). The mean is
    exact (running sum); the median comes from a histogram of 0.01° bins over [0°, 180°] (exact
    up to 0.01°, constant memory); within_* are the fractions with err < 11.25°, 22.5°, 30°.
    """

    higher_is_better = {
        "mean": False,
        "median": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    primary = "mean"
    bin_width = 0.01
    thresholds = (11.25, 22.5, 30.0)

    def reset(self) -> None:
        self.hist = torch.zeros(round(180 / self.bin_width) + 1, dtype=torch.long)
        self.sum = 0.0
        self.within = [0, 0, 0]
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape or pred.dim() < 2 or pred.shape[1] != 3:
            _check_shapes("NormalMetric", pred, target, "equal shapes [B,3,H,W]")
        pred, target = pred.detach().double().cpu(), target.double().cpu()
        valid = target.abs().sum(1) > 0
        pred = torch.nn.functional.normalize(pred, dim=1)
        cos = (pred * torch.nn.functional.normalize(target, dim=1)).sum(1)[valid]
        err = torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))
        self.sum += err.sum().item()
        self.count += err.numel()
        for i, t in enumerate(self.thresholds):
            self.within[i] += int((err < t).sum())
        bins = (err / self.bin_width).round().long().clamp(0, self.hist.numel() - 1)
        self.hist += torch.bincount(bins, minlength=self.hist.numel())

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("NormalMetric: no valid normal pixels seen")
        cum = self.hist.cumsum(0)
        # Lower median (the ceil(n/2)-th smallest error), read off the histogram.
        median = int(torch.searchsorted(cum, (self.count + 1) // 2)) * self.bin_width
        out = {"mean": self.sum / self.count, "median": median}
        for t, n in zip(self.thresholds, self.within, strict=True):
            out[f"within_{t:g}"] = n / self.count
        return out


def _binary_pred(pred: torch.Tensor, threshold: float | None) -> torch.Tensor:
    # Float predictions are logits (threshold 0) unless a threshold (e.g. 0.5 for probabilities)
    # is given; integer/bool predictions are already labels.
    if pred.is_floating_point():
        return pred > (0.0 if threshold is None else threshold)
    return pred != 0


class MultiLabelF1(Metric):
    """Per-attribute F1 from split-level tp/fp/fn, averaged over attributes (CelebA protocol).

    ``pred`` [B,A] logits (or labels), ``target`` [B,A] in {0,1}. F1_a = 2tp / (2tp + fp + fn);
    an attribute with 2tp + fp + fn = 0 (never predicted nor present) is left out of the mean,
    and ``f1`` is 0.0 when no attribute is defined (sklearn's ``zero_division=0``).
    """

    higher_is_better = {"f1": True, "accuracy": True}
    primary = "f1"

    def __init__(self, num_attributes: int, threshold: float | None = None) -> None:
        self.num_attributes = num_attributes
        self.threshold = threshold
        super().__init__()

    def reset(self) -> None:
        self.tp = torch.zeros(self.num_attributes, dtype=torch.long)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)
        self.correct = torch.zeros_like(self.tp)
        self.count = 0

    def _reshape(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.num_attributes
        if pred.shape != target.shape or pred.shape[-1:] != (a,) or pred.dim() != 2:
            _check_shapes(type(self).__name__, pred, target, f"equal shapes [B,{a}]")
        return pred, target

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = self._reshape(pred, target)
        p = _binary_pred(pred.detach().cpu(), self.threshold)
        t = target.cpu() != 0
        self.tp += (p & t).sum(0)
        self.fp += (p & ~t).sum(0)
        self.fn += (~p & t).sum(0)
        self.correct += (p == t).sum(0)
        self.count += p.shape[0]

    def per_attribute(self) -> torch.Tensor:
        """F1 of each attribute (NaN where undefined)."""
        denom = (2 * self.tp + self.fp + self.fn).double()
        return torch.where(denom > 0, 2 * self.tp / denom.clamp(min=1), torch.nan)

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError(f"{type(self).__name__}: no samples seen")
        f1 = self.per_attribute()
        return {
            "f1": float(f1.nanmean()) if (~f1.isnan()).any() else 0.0,
            "accuracy": float(self.correct.sum()) / (self.count * self.num_attributes),
        }


class BinaryF1(MultiLabelF1):
    """F1 and accuracy of one binary task: ``pred`` [B] or [B,1] logits, ``target`` [B] or [B,1]."""

    def __init__(self, threshold: float | None = None) -> None:
        super().__init__(1, threshold)

    def _reshape(self, pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if pred.numel() != target.numel() or pred.dim() > 2 or target.dim() > 2:
            _check_shapes("BinaryF1", pred, target, "[B] or [B,1] each")
        return pred.reshape(-1, 1), target.reshape(-1, 1)


class Accuracy(Metric):
    """Top-1 accuracy: ``pred`` logits [B,C] or labels [B], ``target`` labels [B]."""

    higher_is_better = {"accuracy": True}
    primary = "accuracy"

    def reset(self) -> None:
        self.correct = 0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1 and pred.shape[0] == target.shape[0]:
            pred = pred.argmax(1)
        if pred.shape != target.shape:
            _check_shapes("Accuracy", pred, target, "[B,C] logits or [B] labels vs [B]")
        self.correct += int((pred.detach().cpu() == target.cpu()).sum())
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("Accuracy: no samples seen")
        return {"accuracy": self.correct / self.count}


class MAE(Metric):
    """Mean absolute error over all elements of the split (e.g. QM9 targets)."""

    higher_is_better = {"mae": False}
    primary = "mae"

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            _check_shapes("MAE", pred, target, "equal shapes")
        self.sum += (pred.detach().double().cpu() - target.double().cpu()).abs().sum().item()
        self.count += target.numel()

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("MAE: no samples seen")
        return {"mae": self.sum / self.count}


def lower_is_better_names(metrics: Mapping[str, Metric] | Sequence[Metric]) -> set[str]:
    """Names of the metrics (over the given accumulators) where lower is better."""
    accs = metrics.values() if isinstance(metrics, Mapping) else metrics
    return {name for m in accs for name, hib in m.higher_is_better.items() if not hib}


def delta_m_terms(
    method: Nested, baseline: Nested, lower_is_better: Collection[str]
) -> dict[str, dict[str, float]]:
    """The signed relative gains (-1)^δ (M - M_B) / M_B × 100 of every (task, metric).

    The baseline decides which tasks and metrics count; the method must have all of them (extra
    entries in the method are ignored). The denominator is |M_B| so that the sign of a term
    always says better/worse, even for a negative baseline value.
    """
    terms: dict[str, dict[str, float]] = {}
    for task, base_metrics in baseline.items():
        if task not in method:
            raise KeyError(f"delta_m: task {task!r} is in the baseline but not in the method")
        if not base_metrics:
            raise ValueError(f"delta_m: baseline task {task!r} has no metrics")
        terms[task] = {}
        for name, base in base_metrics.items():
            if name not in method[task]:
                raise KeyError(f"delta_m: metric {task}/{name} is in the baseline, not the method")
            if base == 0:
                raise ValueError(f"delta_m: baseline {task}/{name} is 0; relative gain undefined")
            sign = -1.0 if name in lower_is_better else 1.0
            terms[task][name] = sign * (method[task][name] - base) / abs(base) * 100.0
    if not terms:
        raise ValueError("delta_m: empty baseline")
    return terms


def delta_m(
    method: Nested, baseline: Nested, lower_is_better: Collection[str], per: str = "task"
) -> float:
    """Multi-task gain Δm in percent of ``method`` over ``baseline`` (``{task: {metric: v}}``).

    ``per="task"``: mean over tasks of the mean of the task's metric terms; ``per="metric"``:
    mean over all metric terms. A name in ``lower_is_better`` applies to that metric in every task.
    """
    if isinstance(lower_is_better, str):
        raise TypeError("lower_is_better must be a collection of metric names, not one string")
    terms = delta_m_terms(method, baseline, lower_is_better)
    if per == "task":
        return sum(sum(t.values()) / len(t) for t in terms.values()) / len(terms)
    if per == "metric":
        flat = [v for t in terms.values() for v in t.values()]
        return sum(flat) / len(flat)
    raise ValueError(f"per must be 'task' or 'metric', got {per!r}")


def average_metrics(runs: Sequence[Nested]) -> dict[str, dict[str, float]]:
    """Element-wise mean of nested metric dicts (e.g. over seeds); all runs need the same keys."""
    if not runs:
        raise ValueError("average_metrics: no runs")
    first = runs[0]
    for i, run in enumerate(runs[1:], start=1):
        if {t: set(m) for t, m in run.items()} != {t: set(m) for t, m in first.items()}:
            raise KeyError(f"average_metrics: run {i} has different tasks/metrics than run 0")
    return {
        task: {name: sum(run[task][name] for run in runs) / len(runs) for name in metrics}
        for task, metrics in first.items()
    }


def delta_m_over_seeds(
    runs: Sequence[Nested],
    baseline: Nested | Sequence[Nested],
    lower_is_better: Collection[str],
    per: str = "task",
) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one run) of Δm over seeds.

    Each run is compared with the baseline; a list of baseline runs is averaged first.
    """
    if not runs:
        raise ValueError("delta_m_over_seeds: no runs")
    if not isinstance(baseline, Mapping):
        baseline = average_metrics(baseline)
    values = [delta_m(run, baseline, lower_is_better, per) for run in runs]
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def kendall_w(scores: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Kendall's coefficient of concordance W of m rankings of the same n items, and the p-value
    of Friedman's test that the rankings are unrelated.

    ``scores[j][i]`` is item i's score in ranking j (e.g. a method's Δm% in seed j; higher
    ranks first). With R_i the sum of item i's ranks over the m rankings and ties given their
    mean rank (Kendall & Babington Smith 1939)::

        W = 12 Σ_i (R_i - m(n+1)/2)² / (m² (n³ - n) - m Σ_j T_j),   T_j = Σ (t³ - t) over ties

    W = 1 when every ranking orders the items the same, W near 0 when they do not agree. Under
    the null the statistic m (n - 1) W is χ² with n - 1 degrees of freedom (Friedman 1937); with
    m = 3 and n ≤ 10 that approximation is rough, so read p as a guide, not a test.
    """
    m = len(scores)
    if m < 2:
        raise ValueError(f"kendall_w: needs at least 2 rankings, got {m}")
    n = len(scores[0])
    if n < 2 or any(len(row) != n for row in scores):
        lengths = [len(row) for row in scores]
        raise ValueError(f"kendall_w: every ranking must score the same n >= 2 items, got {lengths}")
    import numpy as np
    from scipy.stats import chi2, rankdata

    table = np.asarray(scores, dtype=float)
    if not np.isfinite(table).all():
        raise ValueError("kendall_w: a score is NaN or infinite; rank only finished, finite results")
    ranks = rankdata(-table, axis=1)  # 1 = highest; ties share their mean rank
    tie_groups = [np.unique(row, return_counts=True)[1] for row in table]
    tie_term = float(sum((t**3 - t).sum() for t in tie_groups))
    spread = float(((ranks.sum(axis=0) - m * (n + 1) / 2) ** 2).sum())
    denominator = m**2 * (n**3 - n) - m * tie_term
    if denominator == 0:  # every ranking ties every item: no order to agree on
        return float("nan"), float("nan")
    w = 12 * spread / denominator
    return w, float(chi2.sf(m * (n - 1) * w, n - 1))
