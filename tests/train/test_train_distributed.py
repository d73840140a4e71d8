"""Two gloo processes on 127.0.0.1 reach the parameters of one process with the same global batch.

Tolerance: 1e-5 absolute + 1e-4 relative. The two runs do the same arithmetic except that sums
over the batch are split across processes (statistics, losses, gradients), which only reorders
float32 additions.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.distributed

CASES = [("tssbn", "ew"), ("tsbn", "db_mtl"), ("tssbn", "pcgrad")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: Path, method: str, balancer: str):
    from train_helpers import toy_config

    # 1 epoch of 4 steps with a global batch of 64 (32 per process)
    return toy_config(
        out,
        method=method,
        balancer=balancer,
        epochs=1,
        data={"n_train": 256, "batch_size": 64},
        optim={"scheduler": "none"},
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    from mtnorm.train import Trainer

    try:
        for method, balancer in CASES:
            trainer = Trainer(_config(Path(out) / f"{method}-{balancer}", method, balancer), log=None)
            trainer.fit()
            state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
            torch.save(state, Path(out) / f"{method}-{balancer}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    from mtnorm.train import Trainer

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for method, balancer in CASES:
        single = Trainer(_config(tmp_path / "single" / f"{method}-{balancer}", method, balancer), log=None)
        single.fit()
        expected = single.model.state_dict()
        ranks = [torch.load(tmp_path / f"{method}-{balancer}-rank{r}.pt") for r in range(2)]
        for name, value in expected.items():
            if not value.is_floating_point():
                assert torch.equal(value, ranks[0][name]), name
                continue
            for got in ranks:
                torch.testing.assert_close(
                    got[name], value, atol=1e-5, rtol=1e-4, msg=f"{method}/{balancer} {name}"
                )


def _signal_worker(rank: int, world: int, port: int, out: str) -> None:
    import signal as sig

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    from mtnorm.train import Trainer

    def term_on_rank1(trainer) -> None:  # only one rank is signalled, as a scheduler may do
        if rank == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), sig.SIGTERM)

    try:
        cfg = _config(Path(out) / "run", "tssbn", "ew")
        result = Trainer(cfg, callbacks=[term_on_rank1], log=None).fit()
        torch.save({"status": result.status, "step": result.step, "signal": result.signal},
                   Path(out) / f"result{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SIGTERM reaches rank 1 only: both ranks stop after the same step (no rank left waiting in a
    collective), rank 0 saves once, and the checkpoint resumes in one process."""
    mp.spawn(_signal_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"result{r}.pt") for r in range(2)]
    assert [r["status"] for r in results] == ["interrupted", "interrupted"]
    assert results[0]["step"] == results[1]["step"] == 2
    from mtnorm.train import checkpoint as ckpt

    assert ckpt.load(tmp_path / "run" / "last.pt")["global_step"] == 2
