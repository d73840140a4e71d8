"""Summaries of grids (mean ± std, Δm%) and the metric logger."""

from __future__ import annotations

import json

from mtnorm.train.experiment import GridResult, summarize
from mtnorm.train.report import MetricsLogger, markdown_table


def run(method, seed, acc, params=100):
    return {"method": method, "seed": seed, "parameters": params, "metrics": {"a": {"accuracy": acc}}}


def test_summary_has_relative_size_mean_std_and_delta_m():
    result = GridResult(
        runs={
            "stl": [run("stl", 0, 0.5, 200), run("stl", 1, 0.5, 200)],
            "hps": [run("hps", 0, 0.55), run("hps", 1, 0.45)],
        }
    )
    table, data = summarize(result)
    assert "| hps    | 0.50 | 50.00 ± 7.07" in table
    assert abs(data["hps"]["delta_m"]["mean"]) < 1e-9
    assert data["stl"]["metrics"]["a/accuracy"]["mean"] == 0.5


def test_zero_baseline_gives_a_dash_not_a_crash():
    result = GridResult(runs={"stl": [run("stl", 0, 0.0)], "hps": [run("hps", 0, 0.3)]})
    table, data = summarize(result)
    assert table.splitlines()[-1].rstrip().endswith("| —          |")


def test_lower_is_better_metrics_flip_the_sign():
    def depth(method, err):
        return {"method": method, "seed": 0, "parameters": 1, "metrics": {"d": {"abs_err": err}}}

    result = GridResult(
        runs={"stl": [depth("stl", 1.0)], "hps": [depth("hps", 0.9)]}, lower_is_better={"abs_err"}
    )
    _, data = summarize(result)
    assert abs(data["hps"]["delta_m"]["mean"] - 10.0) < 1e-9


def test_logger_keeps_csv_columns_across_resumes(tmp_path):
    log = MetricsLogger(tmp_path)
    log.log("train", 1, {"epoch": 0, "a": 1.0})
    log.close()
    again = MetricsLogger(tmp_path)
    again.log("train", 2, {"epoch": 0, "a": 0.5, "extra": 3})
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert lines == ["kind,step,epoch,a", "train,1,0,1.0", "train,2,0,0.5"]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["extra"] == 3


def test_markdown_table_pads_columns():
    assert markdown_table(["x", "long"], [["1", "2"]]).splitlines()[1] == "|---|------|"


def test_grid_summary_reports_flops_relative_to_the_baseline(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from train_helpers import toy_config

    from mtnorm.train import to_dict
    from mtnorm.train.experiment import Variant, run_grid

    base = to_dict(toy_config(tmp_path / "unused", epochs=1, log_every=100))
    variants = [Variant("stl"), Variant("hps"), Variant("tssbn")]
    result = run_grid(base, variants, [0], tmp_path / "grid", log=lambda _m: None)
    table, data = summarize(result)
    assert table.splitlines()[0].startswith("| Method | #P   | #F ")
    # STL runs two encoders, TSσBN one encoder twice (a pass per task), HPS one encoder once
    assert data["tssbn"]["flops"] == data["stl"]["flops"]
    assert data["hps"]["flops"] < data["stl"]["flops"]
