"""The flat gradient all-reduce of distributed training (``MTNORM_GRAD_SYNC=flat``; under the
default ``auto``, the path of gradient balancers; DDP's is tested in test_ddp_model.py).

* 2 gloo processes reach the parameters of one process on the same global batch for equal
  weighting, two loss weightings (UW, DWA) and two gradient balancers (PCGrad, DB-MTL), with the
  two ranks bit-identical to each other; also 4 ranks (EW and UW on the default DDP path,
  PCGrad and DB-MTL on flat). Tolerance: 1e-5 absolute + 1e-4
  relative (measured max absolute difference: 3.0e-6 for DWA, 2.6e-6 EW, 2.2e-6 PCGrad, 1.8e-7
  UW and DB-MTL; the runs differ only in the order of float32 additions over the batch). The flat
  and hook paths give bit-identical PCGrad parameters. fp16: ranks bit-identical, same loss scale
  and skipped steps as the hook path and as one process on the global batch, from the default
  first scale 2**16 (no step skipped: issue 12) and from 2**19 (the first step overflows), with
  one process's parameters to fp16's tolerance (:func:`assert_close_fp16`).
* Collectives per step, counted by wrapping ``torch.distributed.all_reduce`` in the workers and
  attributing each call to the file that issued it: exactly 1 gradient collective per step
  (2 for loss weighting: the loss values, then the gradient) plus the stop flag, against one per
  parameter and task pass on the ``hooks`` path. The task-norm statistics' collectives
  (``mtnorm/norm/sync.py``) are counted apart: they are activations, not gradients.
* Without processes: ``Balancer.backward(reduce=...)`` on two half batches, with a ``reduce``
  that averages the two halves' flat tensors, equals the backward on the whole batch.
"""

from __future__ import annotations

import os
import socket
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

CASES = [("tssbn", "ew"), ("tsbn", "uw"), ("tssbn", "dwa"), ("tssbn", "pcgrad"), ("tsbn", "db_mtl")]
# per step: (gradient collectives, other trainer collectives) on the flat path
EXPECTED = {"ew": (1, 1), "uw": (2, 1), "dwa": (2, 1), "pcgrad": (1, 1), "db_mtl": (1, 1)}
HOOK_CASE = ("tssbn", "pcgrad")
# 4 ranks: equal and loss weighting on the default path (DDP), two gradient balancers on flat
FOUR_RANK_RUNS = [
    ("auto", ("tssbn", "ew")),
    ("auto", ("tsbn", "uw")),
    ("flat", HOOK_CASE),
    ("flat", ("tsbn", "db_mtl")),
]
FP16_CASES = [("tssbn", "ew"), ("tssbn", "pcgrad")]
# the fp16 runs' first loss scale: the default, and 8x that (the first step overflows everywhere)
FP16_START = {"fp16": 2.0**16, "fp16-hooks": 2.0**16, "fp16-x8": 2.0**19}


def assert_close_fp16(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Parameters after fp16 training on 2 ranks against one process on the global batch.

    The runs differ in the rounding of half-precision partial sums over 32 vs 64 samples (about
    1e-3 of a gradient). Adam's step does not depend on the gradient's scale, so that changes a
    step by about 1e-3 of the learning rate: 1e-5 per step at lr 1e-2, 1e-3 for TSσBN's gates
    (``gamma``, 100x the learning rate). Measured over the 4 steps: at most 4.5e-5, and 9.7e-4 for
    ``gamma`` (one process in fp16 against fp32: 4.3e-3 and 1.8e-2). A step skipped on one side
    only moves parameters by a whole step: 1e-2, and about 1 for ``gamma``.
    """
    atol = 3e-3 if name.endswith("gamma") else 1e-4
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(out: Path, method: str, balancer: str, precision: str = "fp32"):
    from train_helpers import toy_config

    # 1 epoch of 4 steps with a global batch of 64 (32 per process)
    return toy_config(
        out,
        method=method,
        balancer=balancer,
        epochs=1,
        precision=precision,
        data={"n_train": 256, "batch_size": 64},
        optim={"scheduler": "none"},
    )


def _origin(filename: str) -> str:
    if filename.endswith(os.path.join("train", "distributed.py")):
        return "grad"
    if filename.endswith(os.path.join("norm", "sync.py")):
        return "norm"
    return "other"


def _join(rank: int, world: int, port: int, **env: str) -> None:
    """The environment torchrun gives a worker (plus ``env``), and this folder on its path."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        **env,
    )
    sys.path.insert(0, str(Path(__file__).parent))


def _count_all_reduce(origin):  # noqa: ANN001, ANN202
    """Wrap ``torch.distributed.all_reduce`` so that every call appends ``origin(caller's file)``
    to the returned list; returns ``(calls, restore)``."""
    import torch.distributed as dist

    calls: list[str] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        calls.append(origin(sys._getframe(1).f_code.co_filename))
        return original(tensor, *args, **kwargs)

    def restore() -> None:
        dist.all_reduce = original

    dist.all_reduce = counting
    return calls, restore


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    import torch.distributed as dist

    from mtnorm.train import Trainer

    calls, restore = _count_all_reduce(_origin)
    try:
        runs = [("flat", c) for c in CASES] + [("hooks", HOOK_CASE)]
        runs += [(sync, c) for c in FP16_CASES for sync in FP16_START]
        if world > 2:
            runs = FOUR_RANK_RUNS
        for sync, (method, balancer) in runs:
            os.environ["MTNORM_GRAD_SYNC"] = {"hooks": "hooks", "auto": "auto"}.get(
                sync.split("-")[-1], "flat"
            )
            marks: list[int] = []
            scales: list[float] = []  # the loss scale after every step
            precision = "fp16" if sync.startswith("fp16") else "fp32"
            trainer = Trainer(
                _config(Path(out) / f"{sync}-{method}-{balancer}", method, balancer, precision),
                callbacks=[
                    lambda _t, marks=marks: marks.append(len(calls)),
                    lambda t, scales=scales: scales.append(t.loss_scale.scale),
                ],
                log=None,
            )
            trainer.loss_scale.scale = FP16_START.get(sync, trainer.loss_scale.scale)
            trainer.fit()
            # the collectives of steps 2..4 (each preceded by its stop flag)
            steps = [Counter(calls[a:b]) for a, b in zip(marks, marks[1:])]
            state = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
            n_params = sum(1 for p in trainer.model.parameters() if p.requires_grad)
            torch.save(
                {
                    "state": state,
                    "steps": steps,
                    "n_params": n_params,
                    "scale": trainer.loss_scale.scale,
                    "scales": scales,
                    "skipped": trainer.loss_scale.skipped,
                },
                Path(out) / f"{sync}-{method}-{balancer}-rank{rank}.pt",
            )
    finally:
        restore()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.distributed
@pytest.mark.parametrize(("method", "balancer"), CASES)
def test_flat_sync_matches_one_process(spawned, method, balancer):
    from mtnorm.train import Trainer

    single = Trainer(_config(spawned / "single" / f"{method}-{balancer}", method, balancer), log=None)
    single.fit()
    expected = single.model.state_dict()
    ranks = [torch.load(spawned / f"flat-{method}-{balancer}-rank{r}.pt")["state"] for r in range(2)]
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ: {name}"
        if not value.is_floating_point():
            assert torch.equal(value, ranks[0][name]), name
            continue
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=1e-4, msg=f"{balancer} {name}")


@pytest.mark.distributed
@pytest.mark.parametrize(("method", "balancer"), CASES)
def test_flat_sync_collectives_per_step(spawned, method, balancer):
    record = torch.load(spawned / f"flat-{method}-{balancer}-rank0.pt")
    grad, other = EXPECTED[balancer]
    assert len(record["steps"]) == 3
    for step in record["steps"]:
        assert step["grad"] == grad, step
        assert step["other"] == other, step  # the stop flag; no separate loss all-reduce


@pytest.mark.distributed
def test_hook_path_issues_one_collective_per_parameter_and_task(spawned):
    method, balancer = HOOK_CASE
    record = torch.load(spawned / f"hooks-{method}-{balancer}-rank0.pt")
    flat = torch.load(spawned / f"flat-{method}-{balancer}-rank0.pt")
    # toy has 2 tasks; every task pass reaches the shared parameters and its own
    for step in record["steps"]:
        assert step["grad"] > record["n_params"], step
        assert step["other"] == 2, step  # the loss values and the stop flag
        assert step["norm"] == flat["steps"][0]["norm"]
    # and the same parameters as the flat path
    for name, value in flat["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(record["state"][name], value, atol=1e-5, rtol=1e-4)


def _toy_problem(seed: int = 0):
    torch.manual_seed(seed)
    shared = torch.nn.Linear(6, 5)
    heads = torch.nn.ModuleList([torch.nn.Linear(5, 1), torch.nn.Linear(5, 1)])
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    return shared, heads, x, y


def _losses(shared, heads, x, y):
    z = torch.relu(shared(x))
    # positive losses (UW/DB-MTL take their logarithm); opposite-ish targets make PCGrad project
    return {
        "a": (heads[0](z)[:, 0] - y[:, 0]).square().mean() + 0.1,
        "b": (heads[1](z)[:, 0] + 3 * y[:, 0]).square().mean() + 0.1,
    }


@pytest.mark.parametrize("name", ["pcgrad", "db_mtl", "uw"])
def test_reduce_on_two_half_batches_equals_the_whole_batch(name):
    """Two threads play two ranks; ``reduce`` averages their flat tensors through a barrier."""
    import threading

    from mtnorm import balance

    problems = [_toy_problem() for _ in range(3)]  # built here: threads must not share the RNG

    def run(balancer, parts, reduce, problem):
        shared, heads, x, y = problem
        params = [*shared.parameters(), *heads.parameters()]
        losses = _losses(shared, heads, x[parts], y[parts])
        diag = balancer.backward(losses, list(shared.parameters()), reduce=reduce)
        return [p.grad.clone() for p in params], diag

    slots: list = [None, None]
    barrier = threading.Barrier(2)
    calls = [0, 0]

    def reduce_for(rank):
        def reduce(flat):
            calls[rank] += 1
            slots[rank] = flat.clone()
            barrier.wait()
            out = (slots[0] + slots[1]) / 2
            barrier.wait()
            return out

        return reduce

    results: list = [None, None]

    def rank(r):
        balancer = balance.get(name, tasks=["a", "b"])
        results[r] = run(balancer, slice(8 * r, 8 * r + 8), reduce_for(r), problems[r])

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ([2, 2] if name == "uw" else [1, 1])
    want, whole = run(balance.get(name, tasks=["a", "b"]), slice(0, 16), None, problems[2])
    for got, diag in results:
        torch.testing.assert_close(diag.losses, whole.losses)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    for g0, g1 in zip(results[0][0], results[1][0]):
        assert torch.equal(g0, g1)


@pytest.mark.distributed
@pytest.mark.parametrize(("method", "balancer"), FP16_CASES)
def test_flat_sync_keeps_fp16_loss_scaling(spawned, method, balancer):
    """fp16 with the dynamic loss scale: the per-parameter hooks only unscale (no collective), the
    flat all-reduce averages. Ranks agree bit for bit, skip the same steps and reach the hook path's
    parameters; one process: see the next test."""
    ranks = [torch.load(spawned / f"fp16-{method}-{balancer}-rank{r}.pt") for r in range(2)]
    hooks = torch.load(spawned / f"fp16-hooks-{method}-{balancer}-rank0.pt")
    assert ranks[0]["scale"] == ranks[1]["scale"] == hooks["scale"]
    for step in ranks[0]["steps"]:
        assert step["grad"] == 1 and step["other"] == 1, step
    for name, value in hooks["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0]["state"][name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize("start", ["fp16", "fp16-x8"])
@pytest.mark.parametrize(("method", "balancer"), FP16_CASES)
def test_fp16_two_ranks_skip_the_steps_of_one_process(spawned, method, balancer, start):
    """From the first scale 2**16, neither skips a step; 2 ranks used to overflow at step 1 (issue
    12: the synchronized TSσBN's backward in half precision). From 2**19 both skip step 1 and
    continue at 2**18. Same scale after every step, then one process's parameters."""
    from mtnorm.train import Trainer

    scales: list[float] = []
    single = Trainer(
        _config(spawned / "single" / f"{start}-{method}-{balancer}", method, balancer, "fp16"),
        callbacks=[lambda t: scales.append(t.loss_scale.scale)],
        log=None,
    )
    single.loss_scale.scale = FP16_START[start]
    single.fit()
    ranks = [torch.load(spawned / f"{start}-{method}-{balancer}-rank{r}.pt") for r in range(2)]
    assert ranks[0]["scales"] == ranks[1]["scales"] == scales
    assert ranks[0]["skipped"] == single.loss_scale.skipped == (1 if start == "fp16-x8" else 0)
    for name, value in single.model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        if value.is_floating_point():
            assert_close_fp16(ranks[0]["state"][name], value, f"{start} {balancer} {name}")
        else:
            assert torch.equal(ranks[0]["state"][name], value), name


@pytest.mark.distributed
def test_four_processes_match_one(tmp_path):
    """4 ranks of 16 samples against one process on the 64-sample batch: EW and UW on DDP (the
    default), PCGrad and DB-MTL on the flat path (exactly 1 gradient collective per step)."""
    from mtnorm.train import Trainer

    mp.spawn(_worker, args=(4, _free_port(), str(tmp_path)), nprocs=4, join=True)
    for sync, (method, balancer) in FOUR_RANK_RUNS:
        single = Trainer(_config(tmp_path / f"single-{method}-{balancer}", method, balancer), log=None)
        single.fit()
        ranks = [torch.load(tmp_path / f"{sync}-{method}-{balancer}-rank{r}.pt") for r in range(4)]
        if sync == "flat":  # DDP's buckets are reduced in C++, out of the wrapper's sight
            for step in ranks[0]["steps"]:
                assert step["grad"] == 1 and step["other"] == 1, (balancer, step)
        for name, value in single.model.state_dict().items():
            for r in ranks[1:]:
                assert torch.equal(ranks[0]["state"][name], r["state"][name]), (balancer, name)
            if value.is_floating_point():
                torch.testing.assert_close(
                    ranks[0]["state"][name],
                    value,
                    atol=1e-5,
                    rtol=1e-4,
                    msg=lambda m, where=f"{balancer} {name}": f"{where}: {m}",
                )


def _nan_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MTNORM_GRAD_SYNC="flat",
    )
    sys.path.insert(0, str(Path(__file__).parent))
    import torch.distributed as dist

    from mtnorm.train import Trainer, TrainingError

    messages = {}
    try:
        for balancer in NAN_CASES:
            trainer = Trainer(_config(Path(out) / balancer, "tssbn", balancer), log=None)
            task = trainer.tasks[0]
            loss = trainer.losses[task]

            def poisoned(*args, loss=loss, trainer=trainer):  # noqa: ANN002
                value = loss(*args)
                return value * float("nan") if rank == 1 and trainer.global_step == 2 else value

            trainer.losses[task] = poisoned
            try:
                trainer.fit()
                messages[balancer] = None
            except TrainingError as e:
                messages[balancer] = (trainer.global_step, str(e))
        torch.save(messages, Path(out) / f"nan-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


NAN_CASES = ["ew", "uw", "pcgrad"]


@pytest.mark.distributed
def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1 alone gets a NaN loss at step 2: the finiteness check runs on the averaged losses, so
    both ranks raise TrainingError at the same step (none is left waiting in a collective)."""
    mp.spawn(_nan_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"nan-rank{r}.pt") for r in range(2)]
    for balancer in NAN_CASES:
        for messages in ranks:
            step, message = messages[balancer]
            assert step == 2, (balancer, message)
            assert "non-finite loss for task" in message, (balancer, message)
