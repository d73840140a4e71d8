"""Equal weighting on DistributedDataParallel (``MTNORM_GRAD_SYNC=ddp``): 2 gloo ranks reach the
parameters of one process (tolerance 1e-5 absolute + 1e-4 relative, as the flat path), the ranks
agree bit for bit, DDP's reducer all-reduces one bucket per step for the toy model (counted with a
comm hook) and the trainer adds the loss values and the stop flag; a gradient balancer falls back
to the flat path."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp_flat import _config, _count_all_reduce, _free_port, _join  # noqa: E402
from test_ddp_flat import _origin as _flat_origin  # noqa: E402

pytestmark = pytest.mark.distributed

CASES = [("tssbn", "ew"), ("tsbn", "ew"), ("tssbn", "pcgrad")]


def _origin(filename: str) -> str:
    # DDP's reducer calls the registered comm hook, whose default all-reduce lives in ddp_comm_hooks
    return "grad" if "ddp_comm_hooks" in filename else _flat_origin(filename)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port, MTNORM_GRAD_SYNC="ddp")
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from mtnorm.train import Trainer

    calls, restore = _count_all_reduce(_origin)
    try:
        for method, balancer in CASES:
            marks: list[int] = []
            trainer = Trainer(
                _config(Path(out) / f"{method}-{balancer}", method, balancer),
                callbacks=[lambda _t, marks=marks: marks.append(len(calls))],
                log=None,
            )
            if trainer._ddp_forward is not None:
                # the default reduction, but through Python, where the wrapper below counts it
                trainer._ddp_forward.register_comm_hook(None, allreduce_hook)
            trainer.fit()
            steps = [Counter(calls[a:b]) for a, b in zip(marks, marks[1:])]
            state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
            torch.save({"state": state, "steps": steps, "sync": trainer.grad_sync},
                       Path(out) / f"{method}-{balancer}-rank{rank}.pt")
    finally:
        restore()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_model")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize(("method", "balancer"), CASES)
def test_ddp_sync_matches_one_process(spawned, method, balancer):
    from mtnorm.train import Trainer

    single = Trainer(_config(spawned / "single" / f"{method}-{balancer}", method, balancer), log=None)
    single.fit()
    ranks = [torch.load(spawned / f"{method}-{balancer}-rank{r}.pt") for r in range(2)]
    assert ranks[0]["sync"] == ("ddp" if balancer == "ew" else "flat")
    for step in ranks[0]["steps"]:
        # DDP: one bucket, plus the loss values and the stop flag; flat: one, plus the stop flag
        assert (step["grad"], step["other"]) == ((1, 2) if balancer == "ew" else (1, 1)), step
    for name, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-5, rtol=1e-4, msg=name)
        else:
            assert torch.equal(ranks[0]["state"][name], value), name
