"""The ``mtnorm`` command: the embedded run, train/eval/bench, and clear one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import only_child, toy_yaml

from mtnorm.cli import main

ROOT = Path(__file__).parents[2]


def fashion_available() -> bool:
    from mtnorm.data import find_fashion_dir

    try:
        find_fashion_dir()
    except FileNotFoundError:
        return False
    return True


def require_fashion() -> None:
    """Real-data tests fail under CI when the files are missing, and skip elsewhere."""
    if fashion_available():
        return
    if os.environ.get("CI") == "true":
        pytest.fail("Fashion-MNIST files are missing under CI=true (run `make data`)")
    pytest.skip("Fashion-MNIST files are not installed")


def test_run_smoke_prints_the_table_and_capacity(tmp_path, capsys):
    require_fashion()
    code = main(["run", "--epochs", "1", "--n-train", "256", "--n-test", "128", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| Method" in out and "Δm% vs stl" in out and "left accuracy" in out
    for method in ("stl", "hps", "tsbn", "tssbn"):
        assert f"| {method} " in out
    assert "Capacity split of tssbn" in out and "independent" in out
    folder = only_child(tmp_path)
    assert f"results go to {folder}" in out
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["variants"]["stl"]["delta_m"]["mean"] == pytest.approx(0.0)
    assert (folder / "summary.md").is_file()


def test_train_eval_and_resume_from_a_config(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    assert "a: accuracy=" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run" / "last.pt")]) == 0
    assert "b: accuracy=" in capsys.readouterr().out
    assert main(["train", str(path), "--resume", "--set", "epochs=2"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_bench_reports_mean_and_std_over_seeds(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    out_dir = tmp_path / "bench"
    code = main(
        [
            "bench",
            str(path),
            "--methods",
            "stl,hps,tssbn",
            "--seeds",
            "2",
            "--alphas",
            "1,100",
            "--out",
            str(out_dir),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "tssbn (α=1)" in out and "tssbn (α=100)" in out and " ± " in out
    data = json.loads((only_child(out_dir) / "summary.json").read_text())
    assert data["variants"]["hps"]["seeds"] == [0, 1]
    assert (only_child(out_dir) / "analysis" / "index.html").is_file()


def test_bench_no_report_writes_the_table_but_no_analysis(tmp_path, capsys):
    out_dir = tmp_path / "bench"
    argv = ["bench", str(toy_yaml(tmp_path)), "--methods", "stl,tssbn", "--seeds", "1", "--out", str(out_dir)]
    assert main([*argv, "--no-report"]) == 0
    assert "analysis of the multi-task runs" not in capsys.readouterr().out
    grid = only_child(out_dir)
    assert (grid / "summary.json").is_file() and not (grid / "analysis").exists()


@pytest.mark.parametrize(
    "argv_extra,expected",
    [
        ({"methd": "hps"}, "unknown key 'methd' (did you mean 'method'?)"),
        ({"method": "hsp"}, "unknown method 'hsp'"),
        ({"balancer": "nope"}, "unknown balancing method 'nope'"),
        ({"data": {"name": "nyuv2", "root": "/nonexistent/nyu"}}, "nyuv2: missing /nonexistent/nyu"),
        ({"epochs": "many"}, "epochs: expected int"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero(tmp_path, capsys, argv_extra, expected):
    code = main(["train", str(toy_yaml(tmp_path, **argv_extra))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mtnorm: error: ") and expected in err.splitlines()[0]
    assert "Traceback" not in err


def test_unknown_method_on_run_and_missing_files(capsys):
    assert main(["run", "--methods", "hps,xyz"]) == 2
    assert "unknown method 'xyz'" in capsys.readouterr().err
    assert main(["train", "/nonexistent.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main(["eval", "/nonexistent.pt"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_missing_fashion_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MTNORM_FASHION_DIR", str(tmp_path / "nothing"))
    path = toy_yaml(tmp_path, data={"name": "multifashion", "root": str(tmp_path / "nothing"), "n_train": 64})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtnorm: error: multifashion:") and "Traceback" not in err


def test_python_dash_m_entry_point_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mtnorm", "train", str(toy_yaml(tmp_path, optim={"lrr": 1}))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key optim.'lrr'" in proc.stderr and "Traceback" not in proc.stderr


def test_methods_lists_methods_and_balancers(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "tssbn" in out and "balancers:" in out and "db_mtl" in out


def test_table_gathers_grids_picks_rows_columns_and_baseline_seeds(tmp_path, capsys):
    folders = []
    for seed in ("0", "1"):
        out = tmp_path / f"grid{seed}"
        argv = ["bench", str(toy_yaml(tmp_path)), "--methods", "stl,hps", "--seeds", f"{seed},"]
        assert main([*argv, "--out", str(out), "--no-report"]) == 0
        folders.append(str(only_child(out)))
    capsys.readouterr()
    assert main(["table", *folders, "--methods", "hps,stl", "--metrics", "a/accuracy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["hps", "stl"]
    assert "b accuracy" not in lines[0] and "seeds" not in lines[0]  # equal rows: no seeds column
    assert main(["table", *folders, "--baseline-seeds", "0,", "--metrics", "a/accuracy"]) == 0
    table = capsys.readouterr().out
    assert "| seeds" in table and "| 0 " in table  # stl keeps seed 0 only
    assert main(["table", *folders, "--per-seed"]) == 0
    per_seed = capsys.readouterr().out.split("per seed")[1]
    assert re.search(r"\|\s*seed 0\s*\|\s*seed 1\s*\|\s*rank 0\s*\|\s*rank 1\s*\|", per_seed)
    assert re.search(r"Kendall's W over seeds 0,1 of the 2 rows that have all of them: (0|1)\.00 ", per_seed)
    assert main(["table", folders[0], "--methods", "mtan"]) == 2
    assert "no finished runs of ['mtan']" in capsys.readouterr().err
    assert main(["table", folders[0], "--metrics", "a/nope"]) == 2
    assert "unknown metric column(s) ['a/nope']" in capsys.readouterr().err
