"""Under ``torchrun``: one rank killed hard (SIGKILL) mid-run, then ``mtnorm train --resume``
under torchrun again, ends bit-identical to the run that was never interrupted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _config(tmp_path: Path, name: str, method: str, balancer: str) -> Path:
    # 3 epochs of 4 steps (global batch 64, 32 per rank); last.pt is written at steps 4, 8, 12
    values = {
        "method": method,
        "balancer": balancer,
        "epochs": 3,
        "seed": 3,
        "out": str(tmp_path / name),
        "data": {"name": "toy", "n_train": 256, "n_test": 64, "batch_size": 64},
        "model": {"hidden": 16},
        "optim": {"lr": 0.01},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not TORCHRUN.is_file(), reason=f"torchrun is not installed beside {sys.executable}")
@pytest.mark.parametrize(("method", "balancer"), [("tssbn", "ew"), ("tssbn", "pcgrad")])
def test_a_rank_killed_mid_run_resumes_bit_identical(tmp_path, method, balancer):
    from mtnorm.train import checkpoint as ckpt

    full = _torchrun("-m", "mtnorm", "train", str(_config(tmp_path, "full", method, balancer)))
    assert full.returncode == 0, full.stderr[-3000:]

    cut_cfg = _config(tmp_path, "cut", method, balancer)
    crashed = _torchrun(str(HERE / "torchrun_crash_worker.py"), str(cut_cfg), "1", "6")
    assert crashed.returncode != 0, "the run should have failed when rank 1 was killed"
    saved = ckpt.load(tmp_path / "cut" / "last.pt")  # verified: complete, not half-written
    assert saved["global_step"] == 4  # the end of epoch 1; steps 5 and 6 are lost with the crash

    resumed = _torchrun("-m", "mtnorm", "train", str(cut_cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = ckpt.load(tmp_path / "full" / "last.pt"), ckpt.load(tmp_path / "cut" / "last.pt")
    assert a["global_step"] == b["global_step"] == 12
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
