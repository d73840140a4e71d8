"""Never lose a run, never save a broken one (issue 9, items 1-4): run folders, the lock, verified
checkpoints, the config check on resume, non-finite weights, signals."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import params_of, toy_config, toy_yaml

from mtnorm.cli import main
from mtnorm.train import ConfigError, Trainer, TrainingError
from mtnorm.train import checkpoint as ckpt
from mtnorm.train.runs import LOCK_NAME, RunFolderError, RunLock, fresh_folder


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- run folders


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "run") in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before  # untouched


def test_overwrite_replaces_the_run_and_its_logs(tmp_path):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--overwrite", "--set", "seed=1"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1  # only the new run's evaluation: logs of two runs never mix
    assert ckpt.load(tmp_path / "run" / "last.pt")["config"]["seed"] == 1


def test_resume_without_last_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no last.pt" in err and str(tmp_path / "run") in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["train", str(toy_yaml(tmp_path)), "--resume", "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_a_second_process_is_kept_out_by_the_lock(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        folder.mkdir()
        (folder / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(RunFolderError, match=f"in use by process {holder.pid}"):
            Trainer(toy_config(folder), log=None).fit()
    finally:
        holder.kill()
        holder.wait()
    assert not (folder / "last.pt").exists()
    # the holder is gone now: its lock is stale and is taken over
    notes: list[str] = []
    result = Trainer(toy_config(folder, epochs=1), log=notes.append).fit()
    assert result.status == "finished" and any("stale lock" in n for n in notes)
    assert not (folder / LOCK_NAME).exists()  # released at the end


def test_the_lock_refuses_a_second_holder_in_this_process(tmp_path):
    with RunLock(tmp_path), pytest.raises(RunFolderError, match="in use by process"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_fresh_folder_never_reuses_a_folder(tmp_path):
    import datetime

    now = datetime.datetime(2026, 11, 22, 14, 30, 12)
    first, second = fresh_folder(tmp_path, now), fresh_folder(tmp_path, now)
    assert first.name == "2026-11-22_143012" and second.name == "2026-11-22_143012-2"


def test_bench_writes_each_invocation_into_a_new_folder(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    args = ["bench", str(path), "--methods", "hps", "--seeds", "1", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    first = {p for p in (tmp_path / "b").iterdir()}
    time.sleep(1.05)  # a new timestamp; within one second the counter suffix is tested above
    assert main(args) == 0
    folders = {p for p in (tmp_path / "b").iterdir()}
    assert len(folders) == 2 and first < folders
    assert all((f / "summary.json").is_file() for f in folders)


# ---------------------------------------------------------------- checkpoints


def _one_run(tmp_path: Path, **overrides) -> Path:
    Trainer(toy_config(tmp_path / "run", epochs=1, **overrides), log=None).fit()
    return tmp_path / "run"


def test_checkpoints_carry_a_digest_and_the_config(tmp_path):
    run = _one_run(tmp_path)
    assert ckpt.verify(run / "last.pt") is None and ckpt.verify(run / "best.pt") is None
    state = ckpt.load(run / "last.pt")
    assert state["format"] == ckpt.FORMAT and state["config"]["out"] == str(run)
    assert torch.load(run / "last.pt", weights_only=False)["global_step"] == state["global_step"]


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_a_flipped_byte_anywhere_is_detected(tmp_path, where):
    path = _one_run(tmp_path) / "last.pt"
    size = path.stat().st_size
    flip_byte(path, {"start": 10, "middle": size // 2, "end": size - 5}[where])
    assert ckpt.verify(path) is not None
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(path)


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_truncated_or_empty_checkpoints_are_damaged(tmp_path, damage):
    path = _one_run(tmp_path) / "last.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.load(path)


def test_resume_from_a_damaged_checkpoint_names_the_intact_one(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    flip_byte(tmp_path / "run" / "last.pt", 100)
    capsys.readouterr()
    assert main(["train", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "last.pt is damaged" in err and f"{tmp_path / 'run' / 'best.pt'} is intact" in err
    assert main(["eval", str(tmp_path / "run" / "last.pt")]) == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.batch_size", 16), ("seed", 3), ("balancer", "db_mtl"), ("optim.lr", 0.5)],
)
def test_resume_refuses_a_config_change_that_alters_the_run(tmp_path, capsys, key, value):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--resume", "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert key in err and "epochs" in err  # the changed key, and the keys that may change


def test_resume_accepts_the_safe_keys(tmp_path, capsys):
    path = toy_yaml(tmp_path)
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--resume", "--set", "epochs=2", "--set", "log_every=3"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(toy_config(tmp_path, epochs=1), log=None)
    trainer.fit()
    before = (tmp_path / "last.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", disk_full)
    trainer.global_step += 1
    with pytest.raises(OSError, match="No space"):
        trainer.save()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert ckpt.verify(tmp_path / "last.pt") is None
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


# ---------------------------------------------------------------- never save a broken model


def test_huge_learning_rate_stops_with_an_error_and_saves_nothing_broken(tmp_path, capsys):
    path = toy_yaml(tmp_path, optim={"lr": 1e20})
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and "finished" not in err
    last = tmp_path / "run" / "last.pt"
    if last.exists():  # whatever was written is finite
        state = ckpt.load(last)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_weights_broken_on_the_last_step_of_an_epoch_are_not_saved(tmp_path):
    def break_at_end_of_second_epoch(trainer: Trainer) -> None:
        if trainer.epoch == 1 and trainer.step_in_epoch == 4:  # 4 batches per epoch
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    cfg = toy_config(tmp_path, epochs=2, data={"n_train": 128})
    trainer = Trainer(cfg, callbacks=[break_at_end_of_second_epoch], log=None)
    expected = r"parameter '.*' is not finite.*last good checkpoint is .*epoch 1"
    with pytest.raises(TrainingError, match=expected):
        trainer.fit()
    state = ckpt.load(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_nan_loss_before_any_checkpoint_says_none_exists(tmp_path):
    def poison(trainer: Trainer) -> None:
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.fill_(float("nan"))

    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        Trainer(toy_config(tmp_path), callbacks=[poison], log=None).fit()


def test_undefined_scores_still_write_best(tmp_path, monkeypatch):
    from mtnorm import metrics

    monkeypatch.setattr(metrics, "delta_m", lambda *a, **k: float("nan"))
    Trainer(toy_config(tmp_path, epochs=2), log=None).fit()
    assert ckpt.verify(tmp_path / "best.pt") is None
    assert ckpt.load(tmp_path / "best.pt")["epoch"] == 1  # the first evaluation, by the rule


def test_a_batch_of_one_sample_is_refused_up_front(tmp_path):
    with pytest.raises(ConfigError, match="batch of one sample"):
        Trainer(toy_config(tmp_path, data={"n_train": 129, "batch_size": 32}), log=None)
    assert not tmp_path.joinpath("last.pt").exists()


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_a_step_boundary_once_even_when_repeated(tmp_path, sig):
    saves: list[str] = []

    def send_twice(trainer: Trainer) -> None:
        if trainer.global_step == 3:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)  # a second signal 0 ms later changes nothing

    before = signal.getsignal(sig)
    trainer = Trainer(toy_config(tmp_path / "cut"), callbacks=[send_twice], log=saves.append)
    result = trainer.fit()
    assert result.status == "interrupted" and result.signal == sig and result.step == 3
    assert sum("interrupted" in s for s in saves) == 1
    assert signal.getsignal(sig) is before  # restored
    resumed = Trainer(toy_config(tmp_path / "cut"), log=None)
    resumed.fit(resume=True)
    full = Trainer(toy_config(tmp_path / "full"), log=None)
    full.fit()
    expected, got = params_of(full), params_of(resumed)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.slow
def test_sigterm_to_the_cli_saves_and_exits_143(tmp_path):
    data = {"name": "toy", "n_train": 256, "n_test": 32, "batch_size": 32}
    path = toy_yaml(tmp_path, epochs=400, log_every=1, data=data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtnorm", "train", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while not (log.exists() and log.stat().st_size > 0) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    state = ckpt.load(tmp_path / "run" / "last.pt")
    assert 0 < state["global_step"] < 400 * 8


def test_an_interrupted_grid_resumes_to_the_same_results(tmp_path):
    from mtnorm.train import to_dict
    from mtnorm.train.experiment import Variant, run_grid, variant_config

    base = to_dict(toy_config(tmp_path / "unused", log_every=100))
    variants = [Variant("stl"), Variant("hps")]
    quiet = lambda _m: None  # noqa: E731
    full = run_grid(base, variants, [0], tmp_path / "full", log=quiet)

    cut = tmp_path / "cut"
    run_grid(base, variants[:1], [0], cut, log=quiet)  # stl finished, then the grid was stopped ...

    def interrupt(trainer: Trainer) -> None:
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stopped = Trainer(variant_config(base, variants[1], 0, cut), callbacks=[interrupt], log=None).fit()
    assert stopped.status == "interrupted"  # ... during hps, which has a last.pt at step 3

    lines: list[str] = []
    resumed = run_grid(base, variants, [0], cut, log=lines.append, resume=True)
    assert any("stl seed 0: finished before" in line for line in lines)
    assert any("resumed from" in line and "at epoch 0 batch 3" in line for line in lines)
    for label in ("stl", "hps"):
        assert resumed.runs[label][0]["metrics"] == full.runs[label][0]["metrics"]
    a = torch.load(tmp_path / "full" / "hps-seed0" / "last.pt", weights_only=False)["model"]
    b = torch.load(cut / "hps-seed0" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_resume_names_a_missing_grid_folder(tmp_path, capsys):
    from mtnorm.cli import main

    path = toy_yaml(tmp_path)
    assert main(["bench", str(path), "--seeds", "1", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "no grid folder at" in capsys.readouterr().err


def _signal_in_the_last_evaluation(monkeypatch, sig: int, trainers: list) -> None:
    """Make the first trainer's final evaluation receive ``sig``, after its last step."""
    evaluate = Trainer.evaluate

    def evaluate_then_signal(self):
        out = evaluate(self)
        if self.epoch == self.cfg.epochs and not trainers:
            trainers.append(self)
            os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(Trainer, "evaluate", evaluate_then_signal)


def test_a_signal_after_the_last_step_finishes_the_run_and_reports_it(tmp_path, monkeypatch):
    logs: list[str] = []
    _signal_in_the_last_evaluation(monkeypatch, signal.SIGTERM, [])
    result = Trainer(toy_config(tmp_path / "run"), log=logs.append).fit()
    assert result.status == "finished" and result.signal == signal.SIGTERM and result.metrics
    assert any("SIGTERM received after the last step; the run finished" in line for line in logs)


def test_a_signal_in_a_grid_runs_final_save_stops_the_grid_after_that_run(tmp_path, monkeypatch):
    """Ctrl-C while one run of a bench grid writes its last checkpoint: that run is complete and
    recorded, the grid stops there, and --resume continues with the next run."""
    from mtnorm.train.config import to_dict
    from mtnorm.train.experiment import Variant, run_grid

    trainers: list = []
    _signal_in_the_last_evaluation(monkeypatch, signal.SIGINT, trainers)
    base = to_dict(toy_config(tmp_path / "unused", epochs=1))
    variants = [Variant("hps"), Variant("tssbn")]
    with pytest.raises(KeyboardInterrupt):
        run_grid(base, variants, [0], tmp_path / "grid", log=lambda _m: None)
    assert (tmp_path / "grid" / "hps-seed0" / "record.json").is_file()
    assert not (tmp_path / "grid" / "tssbn-seed0").exists()
    result = run_grid(base, variants, [0], tmp_path / "grid", resume=True, log=lambda _m: None)
    assert list(result.runs) == ["hps", "tssbn"]
