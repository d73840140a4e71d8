"""Epochs to 95% of the final score, from per-epoch evaluations, and its bench column."""

from __future__ import annotations

import json

import pytest
from train_helpers import toy_config

from mtnorm.train import to_dict
from mtnorm.train.convergence import (
    epochs_to_fraction,
    eval_history,
    run_epochs_to_fraction,
    scores,
    summarize_epochs,
)
from mtnorm.train.experiment import (
    Variant,
    balancer_label,
    load_grid,
    load_records,
    run_grid,
    summarize,
    write_summary,
)


def write_evals(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "step": 1, "epoch": 0, "a": 1.0}) + "\n")
        for epoch, values in rows:
            f.write(json.dumps({"kind": "eval", "step": epoch * 10, "epoch": epoch, **values}) + "\n")


def test_hand_made_sequence_higher_is_better(tmp_path):
    # final accuracies 0.8 / 0.6; scores: e1 (0.4/0.8+0.3/0.6)/2 = 0.5, e2 (0.76/0.8+0.6/0.6)/2 = 0.975,
    # e3 (0.8/0.8+0.54/0.6)/2 = 0.95, e4 = 1
    rows = [
        (1, {"a/accuracy": 0.4, "b/accuracy": 0.3, "loss/a": 2.0}),
        (2, {"a/accuracy": 0.76, "b/accuracy": 0.6}),
        (3, {"a/accuracy": 0.8, "b/accuracy": 0.54}),
        (4, {"a/accuracy": 0.8, "b/accuracy": 0.6}),
    ]
    write_evals(tmp_path, rows)
    history = eval_history(tmp_path)
    assert [e for e, _ in history] == [1, 2, 3, 4]
    assert "loss" not in history[0][1]
    assert [round(s, 6) for _, s in scores(history)] == [0.5, 0.975, 0.95, 1.0]
    assert epochs_to_fraction(history) == 2
    assert epochs_to_fraction(history, fraction=0.96) == 4  # epoch 3 dips below 0.96
    assert epochs_to_fraction(history, fraction=0.4) == 1


def test_a_lucky_early_evaluation_does_not_count(tmp_path):
    rows = [
        (1, {"a/accuracy": 0.9}),
        (2, {"a/accuracy": 0.5}),
        (3, {"a/accuracy": 0.88}),
        (4, {"a/accuracy": 0.9}),
    ]
    write_evals(tmp_path, rows)
    assert epochs_to_fraction(eval_history(tmp_path)) == 3


def test_lower_is_better_is_inverted_and_primary_is_the_first_metric(tmp_path):
    # depth error falls 0.5 -> 0.2 (final/value: 0.4, 0.8, 1); the second metric must be ignored
    rows = [
        (1, {"d/abs": 0.5, "d/rel": 100.0}),
        (2, {"d/abs": 0.25, "d/rel": 100.0}),
        (3, {"d/abs": 0.2, "d/rel": 0.001}),
    ]
    write_evals(tmp_path, rows)
    history = eval_history(tmp_path)
    assert [round(s, 6) for _, s in scores(history, {"abs", "rel"})] == [0.4, 0.8, 1.0]
    assert epochs_to_fraction(history, {"abs"}) == 3
    # read as higher-is-better, the falling error would look converged at once
    assert epochs_to_fraction(history) == 1


def test_resumed_run_keeps_the_last_record_of_an_epoch(tmp_path):
    rows = [(1, {"a/accuracy": 0.1}), (1, {"a/accuracy": 0.95}), (2, {"a/accuracy": 1.0})]
    write_evals(tmp_path, rows)
    history = eval_history(tmp_path)
    assert history == [(1, {"a": {"accuracy": 0.95}}), (2, {"a": {"accuracy": 1.0}})]
    assert epochs_to_fraction(history) == 1


def test_missing_history_and_summary():
    assert epochs_to_fraction([]) is None
    assert run_epochs_to_fraction({"out": "/nonexistent/run"}) is None
    assert summarize_epochs([2, None]) is None
    s = summarize_epochs([1, 2, 3])
    assert s["mean"] == 2 and s["std"] == pytest.approx(1.0) and s["values"] == [1, 2, 3]
    assert summarize_epochs([4])["std"] is None


def test_bench_summary_has_the_epochs_column_and_json(tmp_path):
    base = to_dict(toy_config(tmp_path / "unused", epochs=3, log_every=100))
    result = run_grid(base, [Variant("stl"), Variant("hps")], [0, 1], tmp_path / "grid", log=lambda _m: None)
    table, data = summarize(result)
    assert table.splitlines()[0].rstrip(" |").endswith("epochs to 95%")
    for label, runs in result.runs.items():
        expected = [epochs_to_fraction(eval_history(r["out"]), result.lower_is_better) for r in runs]
        assert data[label]["epochs_to_95"]["values"] == expected
        assert all(1 <= e <= 3 for e in expected)
    write_summary(result, table, data, base)
    again, _ = summarize(load_grid(tmp_path / "grid"))
    assert again == table
    # the same table from the runs' own records, and from a part of them gathered elsewhere
    assert summarize(load_records(tmp_path / "grid", order=["stl", "hps"]))[0] == table
    assert list(load_records(tmp_path / "grid").runs) == ["hps", "stl"]  # no order: alphabetical
    for run in ("stl-seed1", "hps-seed0"):
        (tmp_path / "part" / run).mkdir(parents=True)
        record = (tmp_path / "grid" / run / "record.json").read_bytes()
        (tmp_path / "part" / run / "record.json").write_bytes(record)
    part = load_records(tmp_path / "part")
    for r in (r for runs in part.runs.values() for r in runs):  # their own run folders still exist
        assert r["out"] == str(tmp_path / "grid" / f"{r['method']}-seed{r['seed']}")
    assert {k: [r["seed"] for r in v] for k, v in part.runs.items()} == {"stl": [1], "hps": [0]}
    with pytest.raises(FileNotFoundError, match="no finished runs"):
        load_records(tmp_path / "unused")
    # a record kept with its metrics.jsonl elsewhere (the run folder gone) reads its history there
    kept = tmp_path / "kept" / "hps-seed0"
    kept.mkdir(parents=True)
    for name in ("record.json", "metrics.jsonl"):
        (kept / name).write_bytes((tmp_path / "grid" / "hps-seed0" / name).read_bytes())
    record = json.loads((kept / "record.json").read_text())
    (kept / "record.json").write_text(json.dumps({**record, "out": str(tmp_path / "gone")}))
    (moved,) = load_records(tmp_path / "kept").runs["hps"]
    assert moved["out"] == str(kept)
    assert summarize(load_records(tmp_path / "kept"))[1]["hps"]["epochs_to_95"] is not None
    # several folders: the runs of per-seed grids gathered; the same run twice is refused
    (tmp_path / "rest" / "stl-seed0").mkdir(parents=True)
    (tmp_path / "rest" / "stl-seed0" / "record.json").write_bytes(
        (tmp_path / "grid" / "stl-seed0" / "record.json").read_bytes()
    )
    both = load_records([tmp_path / "part", tmp_path / "rest"], order=["stl", "hps"])
    assert {k: [r["seed"] for r in v] for k, v in both.runs.items()} == {"stl": [0, 1], "hps": [0]}
    with pytest.raises(ValueError, match=r"hps seed 0 is in both .*grid.* and .*part"):
        load_records([tmp_path / "grid", tmp_path / "part"])
    # the same method under another balancer is another row
    record = json.loads((tmp_path / "grid" / "hps-seed0" / "record.json").read_text())
    assert record["balancer"] == "ew"
    other = tmp_path / "other" / "hps-seed0"
    other.mkdir(parents=True)
    (other / "record.json").write_text(json.dumps({**record, "balancer": "db_mtl"}))
    mixed = load_records([tmp_path / "grid", tmp_path / "other"], order=["stl", "hps", "hps+db_mtl"])
    assert list(mixed.runs) == ["stl", "hps", "hps+db_mtl"] and len(mixed.runs["hps+db_mtl"]) == 1


@pytest.mark.parametrize(
    "name, options, label",
    [
        ("ew", {}, "ew"),
        ("db_mtl", {}, "db_mtl"),
        ("ew", {"log_losses": True}, "log_losses"),
        ("ew", {"max_norm": {"beta": 0.5}}, "max_norm(beta=0.5)"),
        ("pcgrad", {"log_losses": True}, "pcgrad+log_losses"),
        ("uw", {"log_losses": False, "max_norm": True}, "uw+max_norm"),
        ("ew", {"max_norm": {"beta": 0}}, "max_norm(beta=0)"),
        ("db_mtl", {"sigma": 0.5, "beta": 0.9}, "db_mtl(beta=0.9,sigma=0.5)"),
        ("pcgrad", {"log_losses": True, "seed": 3}, "pcgrad+log_losses"),
    ],
)
def test_balancer_labels_name_db_mtl_halves(name, options, label):
    assert balancer_label(name, options) == label


def test_summarize_shows_chosen_columns_and_seeds_but_delta_m_uses_every_metric(tmp_path):
    base = to_dict(toy_config(tmp_path / "unused", epochs=1, log_every=100))
    result = run_grid(base, [Variant("stl"), Variant("hps")], [0, 1], tmp_path / "grid", log=lambda _m: None)
    full, data = summarize(result)
    picked, picked_data = summarize(result, columns=["b/accuracy"], seeds_column=True)
    header = [c.strip() for c in picked.splitlines()[0].strip("|").split("|")]
    assert header[:5] == ["Method", "seeds", "#P", "#F", "b accuracy"] and "a accuracy" not in header
    assert picked_data == data  # the JSON keeps every metric
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    delta, full_delta = header.index("Δm% vs stl"), cells(full.splitlines()[0]).index("Δm% vs stl")
    for row, full_row in zip(picked.splitlines()[2:], full.splitlines()[2:]):
        assert cells(row)[1] == "0,1"
        assert cells(row)[delta] == cells(full_row)[full_delta]
    with pytest.raises(ValueError, match=r"unknown metric column\(s\) \['b/acc'\]; the runs have a/accuracy"):
        summarize(result, columns=["b/acc"])


def test_per_seed_delta_m_compares_each_run_with_the_mean_baseline_and_ranks_rows_per_seed():
    from mtnorm.train.experiment import GridResult, per_seed_delta_m, seed_agreement

    def run(seed: int, acc: float, err: float) -> dict:
        return {"seed": seed, "metrics": {"a": {"accuracy": acc}, "b": {"abs_err": err}}}

    result = GridResult(
        runs={
            "stl": [run(0, 0.5, 1.0), run(1, 0.7, 1.0)],  # mean: accuracy 0.6, error 1.0
            "hps": [run(0, 0.66, 1.0), run(1, 0.6, 0.8)],
            "mtan": [run(1, 0.6, 1.1)],
        },
        lower_is_better={"abs_err"},
    )
    table, values = per_seed_delta_m(result)
    # Δm = mean over tasks of ±(m - m_base) / m_base, in percent
    assert values["hps"][0] == pytest.approx(100 * (0.1 + 0.0) / 2)
    assert values["hps"][1] == pytest.approx(100 * (0.0 + 0.2) / 2)
    assert values["stl"][0] == pytest.approx(100 * (-1 / 6) / 2)
    assert values["mtan"] == {1: pytest.approx(100 * (0.0 - 0.1) / 2)}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    ranks = {row[0]: row[-2:] for row in cells}
    assert ranks == {"stl": ["2", "2"], "hps": ["1", "1"], "mtan": ["—", "3"]}
    # mtan lacks seed 0, so W is over stl and hps, which both seeds order the same
    line = seed_agreement(values)
    assert line.startswith(
        "Kendall's W over seeds 0,1 of the 2 rows that have all of them (1 left out): 1.00"
    )
    values["hps"][1] = -50.0  # seed 1 now puts stl first: the two seeds disagree
    assert ": 0.00 (" in seed_agreement(values)
    too_few = seed_agreement({"stl": values["stl"], "mtan": values["mtan"]})
    assert "needs 2 rows that have every seed [0, 1]; 1 of the rows do" in too_few
    with pytest.raises(KeyError, match="no 'base' runs"):
        per_seed_delta_m(result, "base")


def test_delta_m_over_chosen_metrics_counts_only_those(tmp_path, capsys):
    """CelebA's Δ% counts F1, not the accuracy beside it: ``delta_over`` / ``--delta-metrics``."""
    import json

    from mtnorm.cli import main
    from mtnorm.train.experiment import GridResult, per_seed_delta_m

    def run(seed: int, f1: float, acc: float) -> dict:
        return {"seed": seed, "parameters": 10, "metrics": {"a": {"f1": f1, "accuracy": acc}}}

    result = GridResult(
        runs={"stl": [run(0, 0.5, 0.8)], "hps": [run(0, 0.6, 0.8)]}, lower_is_better=set()
    )
    # every metric: (20% + 0%) / 2 within the task; F1 only: 20%
    assert summarize(result)[1]["hps"]["delta_m"]["mean"] == pytest.approx(10.0)
    assert summarize(result, delta_over=["a/f1"])[1]["hps"]["delta_m"]["mean"] == pytest.approx(20.0)
    assert per_seed_delta_m(result, delta_over=["a/f1"])[1]["hps"][0] == pytest.approx(20.0)
    with pytest.raises(ValueError, match=r"unknown Δm% metric\(s\) \['a/miou'\]"):
        summarize(result, delta_over=["a/miou"])

    for label, runs in result.runs.items():
        folder = tmp_path / "grid" / f"{label}-seed0"
        folder.mkdir(parents=True)
        record = {"method": label, "alpha": None, "lower_is_better": [], **runs[0]}
        (folder / "record.json").write_text(json.dumps(record))
    grid = str(tmp_path / "grid")
    assert main(["table", grid, "--metrics", "a/f1", "--delta-metrics", "shown"]) == 0
    out = capsys.readouterr().out
    assert "Δm% counts only a/f1" in out and "| 20.00" in out.splitlines()[2]
    assert main(["table", grid, "--delta-metrics", "shown"]) == 2
    assert "give the columns with --metrics" in capsys.readouterr().err


def test_table_at_an_earlier_epoch_reads_each_runs_evaluation_of_it(tmp_path, capsys):
    from mtnorm.cli import main
    from mtnorm.train.experiment import at_epoch

    base = to_dict(toy_config(tmp_path / "unused", epochs=2, log_every=100))
    run_grid(base, [Variant("stl"), Variant("hps")], [0], tmp_path / "grid", log=lambda _m: None)
    result = load_records(tmp_path / "grid")
    first = at_epoch(result, 1)
    for label, runs in result.runs.items():
        (run,) = runs
        history = dict(eval_history(run["out"]))
        assert first.runs[label][0]["metrics"] == history[1] != run["metrics"]
        assert at_epoch(result, 2).runs[label][0]["metrics"] == run["metrics"]  # the last epoch
    assert result.runs["hps"][0]["metrics"] != first.runs["hps"][0]["metrics"]  # the input is kept
    with pytest.raises(ValueError, match=r"hps seed 0 has no evaluation of epoch 3 \(epochs: \[1, 2\]\)"):
        at_epoch(result, 3)
    assert main(["table", str(tmp_path / "grid"), "--epoch", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == summarize(first)[0].splitlines()[0]
    assert main(["table", str(tmp_path / "grid"), "--epoch", "5"]) == 2
    assert "--epoch: " in capsys.readouterr().err
