"""The analysis framework (issue 10): closed forms on hand-made matrices, degenerate inputs, the
pruning experiment on a model whose tasks use disjoint filters, and the report on a tiny run."""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.analysis import (
    capacity_per_layer,
    capacity_split,
    cooccurrence,
    diagnose,
    normalized_importance,
    pruning_matrix,
    relation_stability,
    specialization_per_layer,
    specialized,
    task_similarity,
    top_filters,
)

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))


def test_capacity_closed_forms():
    orthogonal = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    for c in capacity_split(orthogonal).values():
        assert c["shared"] == pytest.approx(0.0, abs=1e-12) and c["independent"] == pytest.approx(c["total"])
    for c in capacity_split(torch.full((3, 5), 0.4)).values():
        # sqrt(|I|² - |Î|²) turns float64 round-off (1e-16) into ~1e-8
        assert c["independent"] == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    for c in capacity_split(torch.rand(4, 30)).values():  # Pythagoras: shared² + indep² = C²
        assert c["shared"] ** 2 + c["independent"] ** 2 == pytest.approx(c["total"] ** 2, rel=1e-9)
    layers = {"l1": orthogonal, "l2": torch.full((2, 4), 0.5)}
    per = capacity_per_layer(layers, ["a", "b"])
    assert per["l1"]["a"]["shared"] == pytest.approx(0.0, abs=1e-12)
    assert per["l2"]["a"]["independent"] == pytest.approx(0.0, abs=1e-6)


def test_similarity_on_hand_made_rows_and_degenerate_ones():
    imp = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 0, 1.0], [0, 0, 0]])
    s = task_similarity(imp)
    assert s[0, 1] == pytest.approx(2**-0.5) and s[0, 2] == 0 and s[1, 2] == 0
    assert s[3].tolist() == [0, 0, 0, 1]  # a zero row: 0 to others, 1 to itself, never NaN
    assert torch.isfinite(task_similarity(torch.zeros(2, 3))).all()
    assert task_similarity(torch.ones(1, 3)).tolist() == [[1.0]]


def test_specialization_on_a_hand_made_matrix():
    imp = torch.tensor([[0.9, 0.5, 0.0, 0.2], [0.1, 0.5, 0.0, 0.2], [0.0, 0.0, 0.0, 0.2]])
    n = normalized_importance(imp)
    assert n[:, 0].tolist() == pytest.approx([0.9, 0.1, 0.0])
    assert n[:, 2].tolist() == pytest.approx([1 / 3] * 3)  # unused filter: shared, not specialized
    mask = specialized(imp)
    assert mask[:, 0].tolist() == [True, False, False] and not mask[:, 1:].any()
    per = specialization_per_layer({"x": imp}, ["a", "b", "c"])
    assert per["x"] == {"any": 0.25, "a": 0.25, "b": 0.0, "c": 0.0}


def test_relation_stability_spearman_on_permuted_copies():
    torch.manual_seed(0)
    sim = task_similarity(torch.rand(5, 40))
    assert relation_stability([sim, sim.clone(), sim.clone()]) == pytest.approx(1.0)
    flipped = 1 - sim  # the pair ranking reversed
    flipped.fill_diagonal_(1)
    assert relation_stability([sim, flipped]) == pytest.approx(-1.0)
    constant = torch.full((3, 3), 0.5)
    assert relation_stability([constant, constant]) == 1.0  # defined, not NaN
    with pytest.raises(ValueError, match="at least 3 tasks"):
        relation_stability([torch.eye(2), torch.eye(2)])
    co = cooccurrence([sim, sim], k=2)
    assert torch.equal(co, co.T) and co.diagonal().tolist() == [1.0] * 5


def test_diagnostics_name_the_failure_signatures():
    assert "barely" in diagnose(torch.full((100,), 0.5))[0]
    assert "collapsed" in diagnose(torch.cat([torch.zeros(50), torch.ones(50)]))[0]
    assert "check the loss scales" in diagnose(torch.rand(10), {"a": 0.8, "b": 0.1})[-1]
    assert diagnose(torch.linspace(0, 1, 101), {"a": 0.5, "b": 0.4}) == []


class TwoPaths(nn.Module):
    """Task a reads only filters 0-3, task b only filters 4-7 (through fixed heads)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        mask_a = torch.tensor([1.0] * 4 + [0.0] * 4)
        self.register_buffer("mask_a", mask_a)

    def forward(self, x):
        z = self.pool(self.bn(self.conv(x)))
        return {"a": (z * self.mask_a).sum(1), "b": (z * (1 - self.mask_a)).sum(1)}


def test_pruning_hurts_the_task_whose_filters_are_closed():
    torch.manual_seed(0)
    model = mtnorm.convert(TwoPaths(), ["a", "b"], norm="sigma")
    with torch.no_grad():  # gates as training would leave them: each task opens its own filters
        model.bn.gamma.copy_(torch.tensor([[3.0] * 4 + [-3.0] * 4, [-3.0] * 4 + [3.0] * 4]))
    model.eval()
    x = torch.rand(16, 1, 4, 4)

    def evaluate(m):
        out = {}
        for t in ("a", "b"):
            with mtnorm.use_task(m, t):
                out[t] = float(m(x)[t].detach().abs().mean())
        return out

    layers = mtnorm.importance(model)
    assert sorted(i for _, i in top_filters(layers, 0, 4)) == [0, 1, 2, 3]
    result = pruning_matrix(model, layers, evaluate, ["a", "b"], k=4)
    d = torch.tensor(result["drop"])
    assert d[0, 0] > 50 and d[1, 1] > 50 and abs(d[0, 1]) < 1e-6 and abs(d[1, 0]) < 1e-6
    assert result["diagonal_mean"] > result["off_diagonal_mean"]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


@pytest.mark.slow
def test_analyze_writes_a_complete_report_for_tiny_runs(tmp_path, capsys):
    from train_helpers import toy_config

    from mtnorm.cli import main
    from mtnorm.train import Trainer

    runs = []
    for seed in (0, 1):
        cfg = toy_config(tmp_path / f"s{seed}", seed=seed, epochs=2)
        Trainer(cfg, log=None).fit()
        runs.append(str(tmp_path / f"s{seed}"))
    Trainer(toy_config(tmp_path / "hps", method="hps", epochs=1), log=None).fit()
    out = tmp_path / "report"
    assert main(["analyze", *runs, str(tmp_path / "hps"), "--out", str(out)]) == 0
    assert f"report: {out / 'index.html'}" in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert "stability" not in data  # two tasks: one pair, no ranking to compare
    assert "no task-specific norm layers" in data["runs"][2]["skipped"]
    first = data["runs"][0]
    assert set(first["capacity"]) == {"a", "b"} and "pruning" in first and "gate_histogram" in first
    parser = _Tags()
    parser.feed((out / "index.html").read_text())
    measured = ("affinity", "embedding")  # any model with shared parameters, HPS included
    per_run = ("capacity", "relations", "specialization", "gates", "gates_per_layer", "pruning", *measured)
    expected = {"compare_gates.png"} | {f"run{i}_{name}.png" for i in (0, 1) for name in per_run}
    expected |= {f"run2_{name}.png" for name in measured}
    assert set(parser.images) == expected  # no conflict records: no conflict figures
    z = torch.tensor(data["runs"][2]["affinity"]["matrix"])
    assert z.shape == (2, 2) and torch.isfinite(z).all()
    assert data["runs"][0]["embedding"]["method"] in ("tsne", "pca")
    assert all((out / src).is_file() and (out / src).stat().st_size > 1000 for src in parser.images)


def test_analyze_names_a_folder_without_checkpoints(tmp_path, capsys):
    from mtnorm.cli import main

    assert main(["analyze", str(tmp_path)]) == 2
    assert "no last.pt or best.pt" in capsys.readouterr().err


def test_filter_cosines_closed_forms():
    from mtnorm.analysis.conflict import conflict_summary, filter_cosines

    g_a = [torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])]
    g_b = [torch.tensor([[0.0, 1.0], [-1.0, -1.0], [1.0, 0.0]])]
    cos = filter_cosines({"a": g_a, "b": g_b})["a|b"]
    assert cos == pytest.approx([0.0, -1.0, 0.0])  # orthogonal, opposed, and an unreached filter
    summary = conflict_summary(cos)
    assert summary["negative"] == pytest.approx(1 / 3) and sum(summary["counts"]) == 3


def test_trainer_records_gradient_conflict_and_the_report_plots_it(tmp_path):
    from train_helpers import toy_config

    from mtnorm.analysis.report import gradient_conflict
    from mtnorm.train import Trainer

    cfg = toy_config(tmp_path / "hps", method="hps", epochs=1, conflict_every=2)
    trainer = Trainer(cfg, log=None)
    trainer.fit()
    lines = (tmp_path / "hps" / "conflict.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 2, 4, 6]  # 8 steps, every 2nd
    summary = gradient_conflict(tmp_path / "hps")
    assert set(summary["pairs"]) == {"a|b"} and summary["all"]["count"] > 0
    assert -1.0 <= summary["all"]["mean"] <= 1.0


def test_report_compares_runs_and_measures_stability_within_one_configuration(tmp_path):
    from train_helpers import toy_config

    from mtnorm.analysis.report import write_report
    from mtnorm.train import Trainer

    three = {"tasks": ["a", "b", "c"]}
    runs = []
    for name, overrides in {
        "s0": {"seed": 0}, "s1": {"seed": 1}, "s2": {"seed": 2},
        "alpha10": {"seed": 0, "optim": {"norm_lr_mult": 10.0}},
        "hps": {"method": "hps"},
    }.items():
        Trainer(toy_config(tmp_path / name, data=three, conflict_every=3, **overrides), log=None).fit()
        runs.append(tmp_path / name)
    index = write_report(runs, tmp_path / "report", pruning=False)
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    # only the three seeds of α = 100 form a group: the α = 10 run and HPS stand alone
    (label, group), = data["stability"].items()
    assert group["seeds"] == [0, 1, 2] and group["alpha"] == 100.0 and "(α=100)" in label
    assert -1.0 <= group["spearman_mean"] <= 1.0
    co = torch.tensor(group["cooccurrence"])
    assert torch.equal(co.diagonal(), torch.ones(3)) and torch.equal(co, co.T)
    assert [r["alpha"] for r in data["runs"]] == [100.0, 100.0, 100.0, 10.0, 1.0]
    parser = _Tags()
    parser.feed(index.read_text())
    assert {"compare_conflict.png", "compare_gates.png", "stability0.png"} <= set(parser.images)
    assert "hps seed 0" in index.read_text()
    agreement = data["runs"][0]["affinity"]["agreement"]  # three tasks: pairs to rank
    assert -1.0 <= agreement <= 1.0
    assert "agreement" not in data["runs"][4]["affinity"]  # HPS has no gates to agree with


def test_report_figures_stay_legible_with_many_tasks(tmp_path):
    """12 tasks (configs/multifashion12.yaml): the relations figure grows with T and the embedding
    gives every task its own colour (matplotlib's default cycle repeats after 10)."""
    from matplotlib.image import imread
    from train_helpers import toy_config

    from mtnorm.analysis.report import task_colors
    from mtnorm.cli import main
    from mtnorm.train import Trainer

    assert len(set(task_colors(12))) == 12 and len(set(task_colors(20))) == 20
    widths = {}
    for tasks in (["a", "b", "c"], [f"t{i}" for i in range(12)]):
        run = tmp_path / f"run{len(tasks)}"
        Trainer(toy_config(run, epochs=1, data={"tasks": tasks}), log=None).fit()
        out = tmp_path / f"report{len(tasks)}"
        assert main(["analyze", str(run), "--out", str(out), "--no-pruning"]) == 0
        data = json.loads((out / "report.json").read_text())["runs"][0]
        assert data["tasks"] == tasks and len(data["embedding"]["points"]) == len(tasks)
        widths[len(tasks)] = imread(out / "run0_relations.png").shape[1]
    assert widths[12] > 1.5 * widths[3]
