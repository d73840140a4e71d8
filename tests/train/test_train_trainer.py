"""The trainer: exact resume, Ctrl-C, mixed precision, non-finite losses, balancers, logs."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest
import torch
from train_helpers import params_of, toy_config

from mtnorm.train import Trainer, TrainingError
from mtnorm.train import checkpoint as ckpt


def interrupt_at(step: int):
    def callback(trainer: Trainer) -> None:
        if trainer.global_step == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("balancer", ["ew", "uw", "rlw", "db_mtl"])
def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, balancer):
    full = Trainer(toy_config(tmp_path / "full", balancer=balancer), log=None)
    done = full.fit()
    assert done.status == "finished"

    cfg = toy_config(tmp_path / "cut", balancer=balancer)
    first = Trainer(cfg, callbacks=[interrupt_at(5)], log=None).fit()  # mid-epoch 0 (8 batches/epoch)
    assert first.status == "interrupted" and first.step == 5
    assert (tmp_path / "cut" / "last.pt").is_file()

    resumed = Trainer(cfg, log=None)
    result = resumed.fit(resume=True)
    assert result.status == "finished" and result.step == done.step
    expected, got = params_of(full), params_of(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert result.metrics == done.metrics


def test_run_time_adds_up_over_resumes(tmp_path):
    cfg = toy_config(tmp_path)
    first = Trainer(cfg, callbacks=[interrupt_at(5)], log=None).fit()
    state = ckpt.load(tmp_path / "last.pt")
    assert 0 < state["seconds"] <= first.seconds
    # stand in for a long first invocation, so the sum cannot pass by timing noise
    state["seconds"] = 1000.0
    ckpt.save_atomic(state, tmp_path / "last.pt")
    start = time.perf_counter()
    result = Trainer(cfg, log=None).fit(resume=True)
    wall = time.perf_counter() - start
    assert result.status == "finished"
    assert 1000.0 < result.seconds <= 1000.0 + wall
    assert ckpt.load(tmp_path / "last.pt")["seconds"] == pytest.approx(result.seconds, abs=wall)


def test_ctrl_c_signal_stops_at_a_step_boundary_and_saves(tmp_path):
    def send_sigint(trainer: Trainer) -> None:
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # the default, or SIG_IGN when run in the background
    result = Trainer(toy_config(tmp_path), callbacks=[send_sigint], log=None).fit()
    assert result.status == "interrupted" and result.step == 3
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["global_step"] == 3 and state["step_in_epoch"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("balancer", ["ew", "pcgrad"])
def test_mixed_precision_runs_with_balancers(tmp_path, precision, balancer):
    trainer = Trainer(toy_config(tmp_path, precision=precision, balancer=balancer, epochs=1), log=None)
    result = trainer.fit()
    assert result.status == "finished"
    assert all(math.isfinite(v) for m in result.metrics.values() for v in m.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    if precision == "fp16":
        assert trainer.loss_scale.scale > 1  # scaled, and the hooks removed the scale again


def test_fp16_per_task_gradients_reach_the_balancer_unscaled(tmp_path):
    seen = {}
    cfg16 = toy_config(tmp_path / "a", precision="fp16", balancer="pcgrad", epochs=1)
    trainer = Trainer(cfg16, log=None)
    original = trainer.balancer.combine

    def spy(grads, losses):
        seen["norm"] = float(grads.norm())
        return original(grads, losses)

    trainer.balancer.combine = spy
    trainer.train_step(torch.arange(32))
    # the scale is 2**16; unscaled gradients of a tiny model are O(1)
    assert 1e-3 < seen["norm"] < 100


def test_nan_loss_names_task_and_step_and_keeps_last_checkpoint(tmp_path):
    trainer = Trainer(toy_config(tmp_path, epochs=3), log=None)

    def poison(t: Trainer) -> None:
        if t.global_step == 10:  # in epoch 1, after epoch 0's checkpoint
            with torch.no_grad():
                head = t.model.heads.heads["b"]
                head.weight.fill_(float("nan"))

    trainer.callbacks.append(poison)
    with pytest.raises(TrainingError, match=r"non-finite loss for task 'b' at step 10"):
        trainer.fit()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 8
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_logs_and_checkpoints_are_written(tmp_path):
    result = Trainer(toy_config(tmp_path, epochs=2), log=None).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert sum(r["kind"] == "eval" for r in records) == 2
    assert (tmp_path / "train.csv").read_text().splitlines()[0].startswith("kind,step")
    assert (tmp_path / "eval.csv").exists()
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    assert result.metrics["a"]["accuracy"] > 0.4  # it learns something in 16 steps


@pytest.mark.parametrize("method", ["stl", "hps", "tsbn", "dwbn", "adain", "ln", "gn"])
def test_every_method_trains_through_the_same_path(tmp_path, method):
    result = Trainer(toy_config(tmp_path, method=method, epochs=1), log=None).fit()
    assert result.status == "finished" and set(result.metrics) == {"a", "b"}


def test_unknown_balancer_lists_the_valid_ones(tmp_path):
    from mtnorm.train import ConfigError

    with pytest.raises(ConfigError, match="unknown balancing method 'nope'.*db_mtl"):
        toy_config(tmp_path, balancer="nope")  # refused when the config is read, before any data


@pytest.mark.parametrize(
    "options, expected",
    [({"log_losses": True}, "LogLosses"), ({"max_norm": True}, "MaxNorm"), ({}, None)],
)
def test_equal_weighting_with_db_mtl_halves_builds_the_balancer(tmp_path, options, expected):
    """``balancer: ew`` with ``log_losses``/``max_norm`` is one half of DB-MTL, not plain EW: the
    options must not be dropped because the name is "ew"."""
    trainer = Trainer(toy_config(tmp_path, method="hps", balancer_kwargs=options, epochs=1), log=None)
    assert (type(trainer.balancer).__name__ if trainer.balancer is not None else None) == expected


def test_batched_forward_mode_trains(tmp_path):
    result = Trainer(toy_config(tmp_path, forward_mode="batched", epochs=1), log=None).fit()
    assert result.status == "finished"


@pytest.mark.parametrize(
    "balancer, forward_mode, expected",
    [
        ("db_mtl", "auto", "sequential"),
        ("pcgrad", "auto", "sequential"),
        ("uw", "auto", "auto"),
        ("ew", "auto", "auto"),
        ("db_mtl", "batched", "batched"),
    ],
)
def test_gradient_balancers_train_on_separate_task_graphs(tmp_path, balancer, forward_mode, expected):
    """ "auto" must not hand a gradient balancer one batched graph: its T backwards would each pay
    for the whole batch, where T separate graphs cost one backward in all."""
    cfg = toy_config(tmp_path, balancer=balancer, forward_mode=forward_mode, epochs=1)
    assert Trainer(cfg, log=None).train_forward_mode == expected


def _all_balancers() -> list[str]:
    from mtnorm import balance

    return balance.available()


@pytest.mark.parametrize("balancer", _all_balancers())
def test_every_balancer_takes_fp16_steps(tmp_path, balancer):
    trainer = Trainer(toy_config(tmp_path, balancer=balancer, precision="fp16", epochs=1), log=None)
    for i in range(2):
        trainer.train_step(torch.arange(32) + 32 * i)
    assert trainer.loss_scale.skipped == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_lora_rank_on_a_backbone_without_transformer_linears_names_them(tmp_path):
    """model.lora_rank wraps the backbone's attention / MLP linears (qkv, proj, fc1, fc2): the toy
    encoder has none, and the error lists the linears it has (the ViT / Swin case is tested in
    tests/integrations/test_timm_config.py)."""
    cfg = toy_config(tmp_path / "run", model={"lora_rank": 4})
    with pytest.raises(ValueError, match=r"add_lora: no nn.Linear matches targets .* the linears are: 0, 3"):
        Trainer(cfg, log=None)


def _step_gradients(trainer, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients one train_step leaves in ``.grad`` (the optimizer step is skipped)."""
    trainer.optimizer.step = lambda *a, **k: None
    trainer.train_step(index)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_task_penalties_join_their_tasks_losses(tmp_path):
    """DSelect-k's entropy penalty (method_kwargs.entropy_reg) adds lambda * dH_t to gate t's
    gradient and nothing to the experts' (phi has no parameters); the logged losses exclude it."""
    from mtnorm.train.loop import take

    torch.manual_seed(0)
    lam, index = 0.5, torch.arange(32)
    runs = {}
    for reg in (0.0, lam):
        cfg = toy_config(tmp_path / f"reg{reg}", method="dselect_k", method_kwargs={"entropy_reg": reg})
        runs[reg] = Trainer(cfg, log=None)
    plain, penalized = (_step_gradients(runs[r], index) for r in (0.0, lam))
    model = runs[0.0].model
    x, _ = take(runs[0.0].train_split, index, runs[0.0].device)
    gate_names = [n for n, _ in model.named_parameters() if n.startswith("gates.")]
    model.zero_grad(set_to_none=True)
    phi = model.features(x)
    (lam * sum(model.gates[t].entropy(phi) for t in model.tasks)).backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert expected and set(expected) <= set(gate_names)  # the selectors' z, not alpha or experts
    assert set(penalized) == set(plain)
    for name, grad in plain.items():
        extra = expected.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(penalized[name], grad + extra, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 1e-4 for g in expected.values())  # the penalty is not empty


def test_entropy_regularization_sparsifies_the_gates_in_training(tmp_path):
    def entropy_after(reg: float) -> float:
        cfg = toy_config(
            tmp_path / f"reg{reg}", method="dselect_k", method_kwargs={"entropy_reg": reg}, epochs=3,
            optim={"lr": 0.05},
        )
        trainer = Trainer(cfg, log=None)
        trainer.fit()
        x = trainer.train_split.inputs[:128]
        model = trainer.model
        with torch.no_grad():
            return float(sum(model.gates[t].entropy(model.features(x)) for t in model.tasks))

    assert entropy_after(1.0) < 0.6 * entropy_after(0.0)  # measured: 0.77 against 1.73 nats
