"""Atomic checkpoint writes."""

from __future__ import annotations

import pytest
import torch

from mtnorm.train import checkpoint as ckpt


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # simulate a crash after some bytes hit the disk
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = ckpt.load(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = ckpt.rng_state()
    a = (torch.rand(2), np.random.rand(), random.random())
    ckpt.set_rng_state(state)
    b = (torch.rand(2), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        ckpt.load(tmp_path / "nope.pt")
