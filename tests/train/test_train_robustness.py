"""Per-task loss weights and the loss-scale robustness report (paper §7.2)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from train_helpers import only_child, toy_config

from mtnorm.cli import main
from mtnorm.train import ConfigError, Trainer
from mtnorm.train.experiment import GridResult
from mtnorm.train.robustness import (
    Perturbation,
    RobustnessResult,
    load_robustness,
    perturbations,
    relative_performance,
    robustness_table,
)


def grads_after_one_step(tmp_path, method: str, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    name = "_".join(f"{t}{w:g}" for t, w in weights.items())
    trainer = Trainer(
        toy_config(tmp_path / f"{method}_{name}", method=method, loss_weights=weights), log=None
    )
    trainer.optimizer.step = lambda *a, **k: None  # keep the gradients, skip the update
    index = torch.arange(32)
    trainer.train_step(index)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_loss_weight_two_doubles_that_tasks_gradient_under_ew(tmp_path):
    g11 = grads_after_one_step(tmp_path, "hps", {"a": 1.0, "b": 1.0})
    g21 = grads_after_one_step(tmp_path, "hps", {"a": 2.0})
    g01 = grads_after_one_step(tmp_path, "hps", {"a": 0.0})
    assert g11.keys() == g21.keys()
    # gradients are linear in the weights: (2,1) - (1,1) = (1,1) - (0,1) = task a's own gradient
    changed = 0
    for n in g11:
        task_a = g11[n] - g01.get(n, torch.zeros_like(g11[n]))
        torch.testing.assert_close(g21[n] - g11[n], task_a, atol=1e-6, rtol=1e-4)
        changed += int(task_a.abs().max() > 1e-6)
    assert changed > 0  # the weight really reached the backward pass
    # a parameter only task a uses (its head) gets exactly twice the gradient
    head_a = [n for n in g11 if n in g01 and g01[n].abs().max() == 0 and g11[n].abs().max() > 0]
    head_a = head_a or [n for n in g11 if n not in g01]
    assert head_a
    for n in head_a:
        torch.testing.assert_close(g21[n], 2 * g11[n])


def test_logged_losses_stay_unweighted(tmp_path):
    plain = Trainer(toy_config(tmp_path / "p", method="hps"), log=None)
    weighted = Trainer(toy_config(tmp_path / "w", method="hps", loss_weights={"b": 2.0}), log=None)
    index = torch.arange(32)
    assert plain.train_step(index) == pytest.approx(weighted.train_step(index))


def test_unknown_task_in_loss_weights_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"loss_weights: unknown task 'c'.*\['a', 'b'\]"):
        Trainer(toy_config(tmp_path / "x", loss_weights={"c": 2.0}), log=None)
    with pytest.raises(ConfigError, match="loss_weights.a: expected a finite non-negative number"):
        toy_config(tmp_path / "x", loss_weights={"a": -1})
    with pytest.raises(ConfigError, match="loss_weights.a"):
        toy_config(tmp_path / "x", loss_weights={"a": "heavy"})
    assert toy_config(tmp_path / "x", loss_weights={"a": 2}).loss_weights == {"a": 2.0}


def test_perturbations_skip_the_unit_scale():
    got = perturbations(["a", "b"], [0.5, 1.0, 2.0])
    assert [(p.task, p.scale) for p in got] == [("a", 0.5), ("a", 2.0), ("b", 0.5), ("b", 2.0)]
    assert got[0].slug == "a_x0.5"


def _run(method: str, seed: int, a: float, b: float) -> dict:
    return {"method": method, "seed": seed, "metrics": {"a": {"accuracy": a}, "b": {"accuracy": b}}}


def test_relative_performance_against_own_run_and_baseline():
    plain = GridResult(runs={"stl": [_run("stl", 0, 0.5, 0.5)], "hps": [_run("hps", 0, 0.8, 0.4)]})
    up = GridResult(runs={"stl": [_run("stl", 0, 0.5, 0.5)], "hps": [_run("hps", 0, 0.88, 0.4)]})
    down = GridResult(runs={"stl": [_run("stl", 0, 0.5, 0.5)], "hps": [_run("hps", 0, 0.8, 0.3)]})
    result = RobustnessResult(
        plain, {"a_x2": (Perturbation("a", 2.0), up), "b_x0.5": (Perturbation("b", 0.5), down)}
    )
    data = relative_performance(result, "stl")
    # hps: a +10% (b unchanged) -> +5; b -25% -> -12.5 (Δm% averages the tasks)
    own = data["hps"]["vs_own"]
    assert own["runs"] == 2
    assert own["mean"] == pytest.approx((5.0 - 12.5) / 2)
    assert own["min"] == pytest.approx(-12.5) and own["max"] == pytest.approx(5.0)
    assert own["std"] == pytest.approx(math.sqrt(2) * 8.75)
    vs_stl = data["hps"]["vs_stl"]  # (0.88/0.5 - 1 + 0.4/0.5 - 1)/2 = 28%; (0.6 - 0.4)/2 = 10%
    assert vs_stl["max"] == pytest.approx(28.0) and vs_stl["min"] == pytest.approx(10.0)
    assert data["stl"]["vs_own"]["std"] == 0
    table = robustness_table(data)
    assert table.splitlines()[0].split("|")[1:-1] == [
        " Method ",
        " runs ",
        " mean rel. perf ",
        " std   ",
        " min    ",
        " max  ",
    ]
    assert "| hps    | 2    | -3.75" in table


def test_bench_loss_scales_expands_the_grid_and_reports(tmp_path, capsys):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(
        f"method: hps\nepochs: 1\nout: {tmp_path / 'run'}\n"
        "data: {name: toy, n_train: 128, n_test: 64, batch_size: 32}\nmodel: {hidden: 16}\n"
    )
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            str(cfg),
            "--methods",
            "stl,hps",
            "--seeds",
            "1",
            "--loss-scales",
            "0.5,2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    out = only_child(out)
    assert "mean rel. perf" in text
    data = json.loads((out / "robustness.json").read_text())
    assert data["scales"] == [0.5, 2.0]
    runs = data["variants"]["hps"]["runs"]
    assert sorted((r["task"], r["scale"]) for r in runs) == [("a", 0.5), ("a", 2.0), ("b", 0.5), ("b", 2.0)]
    ckpt = torch.load(out / "loss_b_x2" / "hps-seed0" / "last.pt", weights_only=False)
    assert ckpt["config"]["loss_weights"] == {"b": 2.0}
    assert (out / "robustness.md").is_file()
    # the folders alone give the same report (e.g. for a grid that was stopped early)
    again = relative_performance(load_robustness(out))
    assert again["hps"]["vs_own"] == pytest.approx(data["variants"]["hps"]["vs_own"])
    assert again["hps"]["vs_stl"] == pytest.approx(data["variants"]["hps"]["vs_stl"])


def test_bad_loss_scales_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "x.yaml", "--loss-scales", "big"])
    assert "--loss-scales takes comma-separated numbers" in capsys.readouterr().err


def test_without_baseline_runs_only_the_own_run_table(tmp_path, capsys):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(
        f"method: hps\nepochs: 1\nout: {tmp_path / 'run'}\n"
        "data: {name: toy, n_train: 64, n_test: 32, batch_size: 32}\nmodel: {hidden: 8}\n"
    )
    out = tmp_path / "bench"
    assert main(["bench", str(cfg), "--seeds", "1", "--loss-scales", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    out = only_child(out)
    assert "mean rel. perf" in text and "vs unperturbed stl" not in text
    assert "vs unperturbed" not in (out / "robustness.md").read_text()
    assert sorted(p.name for p in out.glob("loss_*")) == ["loss_a_x2", "loss_b_x2"]
