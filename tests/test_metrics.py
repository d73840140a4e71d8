"""Split-level metric accumulators and Δm, including the TSσBN paper's Table 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtnorm.data.spec import nyuv2_specs
from mtnorm.metrics import (
    MAE,
    Accuracy,
    BinaryF1,
    DepthMetric,
    MultiLabelF1,
    NormalMetric,
    SegmentationMetric,
    average_metrics,
    delta_m,
    delta_m_over_seeds,
    delta_m_terms,
    kendall_w,
    lower_is_better_names,
)


def run(metric, preds, targets, sizes):
    """Feed the split in batches of the given sizes."""
    metric.reset()
    start = 0
    for size in sizes:
        metric.update(preds[start : start + size], targets[start : start + size])
        start += size
    assert start == len(preds)
    return metric.compute()


# --- segmentation ---------------------------------------------------------------------------


def test_segmentation_by_hand():
    target = torch.tensor([[[0, 0, 1, 1], [2, 2, -1, -1]]])
    pred = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 0]]])
    m = SegmentationMetric(3)
    m.update(pred, target)
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1, fn 0 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    out = m.compute()
    assert out["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert out["pixel_acc"] == pytest.approx(4 / 6)


def test_segmentation_is_split_level_not_batch_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, 6, 7, generator=g)
    target = torch.randint(-1, 5, (10, 6, 7), generator=g)
    target[:3] = torch.where(target[:3] == 4, 0, target[:3])  # class 4 absent from early batches
    whole = run(SegmentationMetric(5), logits, target, [10])
    split = run(SegmentationMetric(5), logits, target, [3, 1, 6])
    assert whole == pytest.approx(split, abs=1e-12)
    # Brute force in numpy.
    p, t = logits.argmax(1).numpy().ravel(), target.numpy().ravel()
    keep = t != -1
    ious = [
        ((p == c) & (t == c) & keep).sum() / (((p == c) & keep) | (t == c)).sum() for c in range(5)
    ]
    assert whole["miou"] == pytest.approx(np.mean(ious))
    batch_means = np.mean([run(SegmentationMetric(5), logits[i : i + 1], target[i : i + 1], [1])
                           ["miou"] for i in range(10)])
    assert abs(batch_means - whole["miou"]) > 1e-3


def test_segmentation_absent_class_is_left_out():
    m = SegmentationMetric(4)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    assert m.compute()["miou"] == 1.0 and torch.isnan(m.iou()[2:]).all()


def test_segmentation_shape_errors_name_both_shapes():
    m = SegmentationMetric(3)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\).*\(2, 4, 6\)"):
        m.update(torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="C = 3"):
        m.update(torch.zeros(2, 4, 4, 5), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="0..2"):
        m.update(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="predicted labels"):
        m.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))


# --- depth ----------------------------------------------------------------------------------


def test_depth_over_valid_pixels():
    target = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[1.5, 1.0], [9.0, 5.0]]]])
    m = DepthMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["abs_err"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    assert out["rel_err"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert DepthMetric.higher_is_better == {"abs_err": False, "rel_err": False}


def test_depth_batching_invariant():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(9, 1, 5, 5, generator=g) + 0.5
    target[target < 0.7] = 0  # invalid pixels, unevenly spread over images
    pred = torch.rand(9, 1, 5, 5, generator=g)
    whole = run(DepthMetric(), pred, target, [9])
    assert whole == pytest.approx(run(DepthMetric(), pred, target, [2, 2, 5]), abs=1e-12)
    with pytest.raises(ValueError, match=r"\(9, 1, 5, 5\).*\(9, 5, 5\)"):
        DepthMetric().update(pred, target[:, 0])


# --- normals --------------------------------------------------------------------------------


def _rotated(angles_deg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit targets (0,0,1) and predictions tilted by the given angles, shaped [B,3,1,W]."""
    a = torch.deg2rad(angles_deg.double())
    pred = torch.stack([torch.sin(a), torch.zeros_like(a), torch.cos(a)], 0)
    target = torch.stack([torch.zeros_like(a), torch.zeros_like(a), torch.ones_like(a)], 0)
    return pred[None, :, None, :], target[None, :, None, :]


def test_normal_angles():
    angles = torch.tensor([5.0, 10.0, 20.0, 25.0, 40.0, 90.0, 170.0], dtype=torch.float64)
    pred, target = _rotated(angles)
    pred = pred * 3.0  # predictions need not be unit length
    m = NormalMetric()
    m.update(pred, target)
    out = m.compute()
    assert out["mean"] == pytest.approx(angles.mean().item(), abs=1e-6)
    assert out["median"] == pytest.approx(25.0, abs=0.01)
    assert out["within_11.25"] == pytest.approx(2 / 7)
    assert out["within_22.5"] == pytest.approx(3 / 7)
    assert out["within_30"] == pytest.approx(4 / 7)


def test_normal_median_over_split_and_invalid_pixels():
    g = torch.Generator().manual_seed(2)
    angles = torch.rand(1000, generator=g, dtype=torch.float64) * 60
    pred, target = _rotated(angles)
    pred, target = pred.reshape(3, 10, 100).permute(1, 0, 2)[..., None], target.reshape(
        3, 10, 100
    ).permute(1, 0, 2)[..., None]
    target[0, :, :50] = 0  # invalid: zero vectors
    valid = angles.reshape(10, 100).clone()
    valid[0, :50] = float("nan")
    kept = valid[~valid.isnan()]
    out = run(NormalMetric(), pred, target, [3, 3, 4])
    assert out["mean"] == pytest.approx(kept.mean().item(), abs=1e-6)
    lower_median = kept.sort().values[(len(kept) + 1) // 2 - 1].item()
    assert out["median"] == pytest.approx(lower_median, abs=0.006)
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        NormalMetric().update(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4, 4))


# --- classification -------------------------------------------------------------------------


def test_multilabel_f1_per_attribute_then_mean():
    target = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
    logits = torch.tensor([[2.0, 1.0, -1], [-1, 3, -2], [1, 1, -1], [-3, -1, -1]])
    m = MultiLabelF1(3)
    run(m, logits, target, [1, 3])
    # attr 0: tp1 fp1 fn1 -> 0.5; attr 1: tp2 fp1 fn0 -> 0.8; attr 2: never -> left out
    assert m.compute()["f1"] == pytest.approx((0.5 + 0.8) / 2)
    assert m.compute()["accuracy"] == pytest.approx(9 / 12)
    assert torch.isnan(m.per_attribute()[2])
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(4, 3\)"):
        m.update(logits[:, :2], target)


def test_binary_f1_and_probabilities():
    m = BinaryF1(threshold=0.5)
    m.update(torch.tensor([0.9, 0.2, 0.7, 0.4]), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert m.compute()["f1"] == pytest.approx(0.5)
    labels = BinaryF1()
    labels.update(torch.tensor([[1], [1]]), torch.tensor([1, 1]))
    assert labels.compute()["f1"] == 1.0


def test_accuracy_and_mae():
    acc = Accuracy()
    run(acc, torch.tensor([[2.0, 1.0], [0.0, 1.0], [3.0, 4.0]]), torch.tensor([0, 0, 1]), [2, 1])
    assert acc.compute()["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        acc.update(torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    mae = MAE()
    run(mae, torch.tensor([1.0, 2.0, 5.0]), torch.tensor([0.0, 2.0, 1.0]), [1, 2])
    assert mae.compute()["mae"] == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="no samples"):
        MAE().compute()


def test_directions_feed_delta_m():
    specs = nyuv2_specs()
    names = lower_is_better_names({t: s.metric() for t, s in specs.items()})
    assert names == {"abs_err", "rel_err", "mean", "median"}
    assert [s.higher_is_better for s in specs.values()] == [True, False, False]


# --- Δm -------------------------------------------------------------------------------------


def test_delta_m_by_hand_task_vs_metric_averaging():
    base = {"seg": {"miou": 40.0}, "depth": {"abs_err": 0.5, "rel_err": 0.2}}
    method = {"seg": {"miou": 44.0}, "depth": {"abs_err": 0.4, "rel_err": 0.25, "extra": 1.0}}
    terms = delta_m_terms(method, base, {"abs_err", "rel_err"})
    assert terms == {
        "seg": {"miou": pytest.approx(10.0)},
        "depth": {"abs_err": pytest.approx(20.0), "rel_err": pytest.approx(-25.0)},
    }
    assert delta_m(method, base, {"abs_err", "rel_err"}) == pytest.approx((10 + (-2.5)) / 2)
    assert delta_m(method, base, {"abs_err", "rel_err"}, per="metric") == pytest.approx(5 / 3)
    assert delta_m(base, base, set()) == 0.0


def test_delta_m_errors():
    base = {"a": {"acc": 0.5}, "b": {"err": 1.0}}
    with pytest.raises(KeyError, match="'b'"):
        delta_m({"a": {"acc": 0.6}}, base, {"err"})
    with pytest.raises(KeyError, match="b/err"):
        delta_m({"a": {"acc": 0.6}, "b": {"other": 1.0}}, base, {"err"})
    with pytest.raises(ValueError, match="b/err is 0"):
        delta_m(base, {"a": {"acc": 0.5}, "b": {"err": 0.0}}, {"err"})
    with pytest.raises(ValueError, match="per must be"):
        delta_m(base, base, {"err"}, per="tasks")
    with pytest.raises(TypeError, match="collection"):
        delta_m(base, base, "err")


def test_seed_helpers():
    runs = [{"t": {"acc": 0.50, "err": 2.0}}, {"t": {"acc": 0.60, "err": 1.0}}]
    assert average_metrics(runs) == {"t": {"acc": pytest.approx(0.55), "err": 1.5}}
    base = {"t": {"acc": 0.5, "err": 2.0}}
    mean, std = delta_m_over_seeds(runs, base, {"err"})
    values = [0.0, (20.0 + 50.0) / 2]
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert delta_m_over_seeds(runs[:1], [base, base], {"err"}) == (0.0, 0.0)
    with pytest.raises(KeyError, match="run 1"):
        average_metrics([runs[0], {"t": {"acc": 1.0}}])


# Table 1 of task-specific-normalization.md (models trained from scratch), baseline = STL.
# NYUv2 (3-task SegNet): Seg mIoU ↑, Depth abs err ↓, Normal mean angle ↓, then the printed Δ%.
NYU_STL = {"seg": 41.45, "depth": 0.580, "normal": 23.80}
NYU_ROWS = {
    "HPS": (42.17, 0.502, 26.63, 1.07),
    "CS": (41.77, 0.492, 26.15, 1.98),
    "MTAN": (43.12, 0.508, 25.44, 3.14),
    "TSBN": (43.47, 0.494, 25.32, 4.42),
    "TSσBN": (43.75, 0.484, 24.09, 6.93),
}
# Cityscapes (3-task DeepLabV3): Seg mIoU ↑, Part-seg mIoU ↑, Disparity err ↓, printed Δ%.
CS_STL = {"seg": 56.61, "part_seg": 53.95, "disparity": 0.841}
CS_ROWS = {
    "HPS": (55.03, 51.92, 0.796, -0.39),
    "CS": (56.73, 53.89, 0.781, 2.43),
    "MTAN": (55.83, 52.61, 0.799, 0.39),
    "TSBN": (56.10, 52.82, 0.806, 0.40),
    "TSσBN": (56.45, 53.26, 0.814, 0.57),
}


def _nested(names, values, metric_names):
    return {t: {m: v} for t, m, v in zip(names, metric_names, values, strict=True)}


@pytest.mark.parametrize(
    "stl, rows, metric_names",
    [
        (NYU_STL, NYU_ROWS, ("miou", "abs_err", "mean_angle")),
        (CS_STL, CS_ROWS, ("miou", "miou", "abs_err")),
    ],
    ids=["nyuv2", "cityscapes"],
)
def test_paper_table_1(stl, rows, metric_names):
    """Every NYUv2 and Cityscapes row of Table 1 reproduces the printed Δ% within 0.05 points.

    One metric per task, so per="task" and per="metric" agree. The printed Δ% is the mean over
    three runs of each run's Δm, while the printed metrics are rounded means (depth to 3 decimals),
    so small gaps are expected: the largest here is NYUv2 CS (2.023 vs 1.98, 0.043) and MTAN
    (3.184 vs 3.14, 0.044). Rounding alone explains this: ±0.0005 on the depth errors of 0.5-0.6
    moves Δ% by up to ~0.055. Table 1's CelebA column is checked below.
    """
    baseline = _nested(stl, stl.values(), metric_names)
    lower = {"abs_err", "mean_angle"}
    for name, (*values, printed) in rows.items():
        method = _nested(stl, values, metric_names)
        got = delta_m(method, baseline, lower)
        assert got == pytest.approx(delta_m(method, baseline, lower, per="metric"))
        terms = delta_m_terms(method, baseline, lower)
        assert abs(got - printed) < 0.05, (name, got, printed, terms)


def test_paper_table_1_celeba():
    # Single metric (mean F1 over the 40 attributes): Δ% = (F1 - 68.21) / 68.21 × 100.
    base = {"celeba": {"f1": 68.21}}
    for f1, printed in ((67.06, -1.69), (65.57, -3.86), (59.49, -12.78), (67.17, -1.52),
                        (69.45, 1.81)):
        assert abs(delta_m({"celeba": {"f1": f1}}, base, set()) - printed) < 0.05


def test_delta_m_sign_follows_direction():
    base = {"d": {"abs_err": 1.0}}
    assert delta_m({"d": {"abs_err": 0.9}}, base, {"abs_err"}) == pytest.approx(10.0)
    assert math.isclose(delta_m({"d": {"abs_err": 0.9}}, base, set()), -10.0)


# Table 2 (LibMTL, pretrained DeepLabV3-ResNet50), baseline = HPS. Columns: NYUv2 Seg ↑,
# Depth ↓, Normal ↓, Δ%; Cityscapes Seg ↑, Depth ↓, Δ%.
TABLE_2_HPS = (53.93, 0.3825, 23.57, 69.81, 0.0125)
TABLE_2 = {
    "CS": (53.44, 0.3818, 23.15, 0.35, 69.97, 0.0123, 0.55),
    "MMOE": (53.14, 0.3876, 23.02, -0.15, 69.81, 0.0126, -0.43),
    "MTAN": (54.64, 0.3771, 23.12, 1.55, 70.62, 0.0125, 0.49),
    "CGC": (53.27, 0.3914, 22.14, 0.84, 69.75, 0.0125, -0.12),
    "PLE": (52.75, 0.3943, 22.10, 0.32, 69.30, 0.0129, -2.02),
    "LTB": (52.58, 0.3828, 23.31, -0.49, 69.81, 0.0125, -0.35),
    "DSelect-k": (53.75, 0.3802, 23.18, 0.64, 69.67, 0.0124, 0.26),
    "TSBN": (53.44, 0.3761, 23.01, 1.04, 69.89, 0.0124, 0.38),
    "TSσBN": (53.78, 0.3735, 22.31, 2.48, 70.17, 0.0123, 0.85),
}


def test_paper_table_2_nyuv2():
    """All NYUv2 rows of Table 2 reproduce within 0.01 points (4-digit depth, 2-digit rest)."""
    seg, dep, nor = TABLE_2_HPS[:3]
    base = {"seg": {"miou": seg}, "depth": {"abs_err": dep}, "normal": {"mean": nor}}
    for name, (s, d, n, printed, *_) in TABLE_2.items():
        method = {"seg": {"miou": s}, "depth": {"abs_err": d}, "normal": {"mean": n}}
        got = delta_m(method, base, {"abs_err", "mean"})
        assert abs(got - printed) < 0.01, (name, got, printed)


def test_paper_table_2_cityscapes_only_within_rounding():
    """Table 2's Cityscapes Δ% can NOT be reproduced within 0.05 from the printed numbers: depth
    errors ~0.0125 are printed with 4 decimals, i.e. to ±0.4 %, which moves a 2-task Δ% by up to
    ±0.4 points (LTB prints the HPS numbers exactly yet Δ = -0.35). We check the honest weaker
    claim: each printed Δ% is reachable when every printed value (baseline too) varies within its
    rounding interval, and the unrounded reading misses by more than 0.05 for some rows."""
    seg_b, dep_b = TABLE_2_HPS[3:]
    misses = 0
    for name, (*_, s, d, printed) in TABLE_2.items():
        corners = [
            delta_m(
                {"seg": {"miou": s + a}, "depth": {"abs_err": d + b}},
                {"seg": {"miou": seg_b + c}, "depth": {"abs_err": dep_b + e}},
                {"abs_err"},
            )
            for a in (-0.005, 0.005)
            for b in (-5e-5, 5e-5)
            for c in (-0.005, 0.005)
            for e in (-5e-5, 5e-5)
        ]
        assert min(corners) <= printed <= max(corners), (name, min(corners), max(corners))
        base = {"seg": {"miou": seg_b}, "depth": {"abs_err": dep_b}}
        point = delta_m({"seg": {"miou": s}, "depth": {"abs_err": d}}, base, {"abs_err"})
        misses += abs(point - printed) > 0.05
    assert misses >= 5


def test_kendall_w_is_one_when_rankings_agree_and_zero_when_they_cancel():
    same = [[3.0, 1.0, 2.0], [30.0, 10.0, 20.0], [0.3, 0.1, 0.2]]  # same order, other scales
    assert kendall_w(same)[0] == pytest.approx(1.0)
    # two opposite rankings: every rank sum is n + 1, no spread
    assert kendall_w([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])[0] == pytest.approx(0.0)


def test_kendall_w_by_hand_and_against_scipys_friedman_test():
    from scipy.stats import friedmanchisquare

    scores = [[5.0, 3.0, 1.0, 0.0], [4.0, 5.0, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]]
    # ranks (1 = best): [1,2,3,4], [2,1,4,3], [1,3,2,4]; sums 4, 6, 9, 11, mean 7.5
    # W = 12 (3.5² + 1.5² + 1.5² + 3.5²) / (3² (4³ - 4)) = 12 * 29 / 540
    w, p = kendall_w(scores)
    assert w == pytest.approx(12 * 29 / 540)
    # Friedman's statistic is m (n - 1) W; scipy ranks within each block itself
    stat, p_scipy = friedmanchisquare(*zip(*scores))
    assert stat == pytest.approx(3 * 3 * w)
    assert p == pytest.approx(p_scipy)
    # with ties scipy applies the same correction
    tied = [[1.0, 1.0, 2.0, 0.0], [2.0, 1.0, 1.0, 0.0], [3.0, 3.0, 3.0, 1.0]]
    stat, p_scipy = friedmanchisquare(*zip(*tied))
    assert 3 * 3 * kendall_w(tied)[0] == pytest.approx(stat)
    assert kendall_w(tied)[1] == pytest.approx(p_scipy)


def test_kendall_w_refuses_fewer_than_two_rankings_or_ragged_rows():
    with pytest.raises(ValueError, match="at least 2 rankings"):
        kendall_w([[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"same n >= 2 items, got \[2, 3\]"):
        kendall_w([[1.0, 2.0], [1.0, 2.0, 3.0]])


def test_kendall_w_names_a_nan_score():
    with pytest.raises(ValueError, match="a score is NaN or infinite"):
        kendall_w([[1.0, float("nan")], [1.0, 2.0]])
