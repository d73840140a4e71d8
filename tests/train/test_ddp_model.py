"""DistributedDataParallel under the default ``MTNORM_GRAD_SYNC=auto`` (2 gloo ranks).

* Equal weighting and loss weighting (UW, DWA) train on DDP: one DDP forward of every task pass,
  one ``.backward()`` of ``sum_t w_t l_t`` with ``w`` from the loss values averaged over the ranks.
  They reach the parameters (and the balancer state: UW's learned log-variances, DWA's loss
  history) of one process on the 64-sample global batch, to 1e-5 absolute + 1e-4 relative as the
  flat path; the ranks agree bit for bit. Gradient balancers (PCGrad, DB-MTL) take the flat path
  under ``auto``, and under an explicit ``ddp`` too.
* Collectives per step, counted two ways: ``torch.distributed.all_reduce`` wrapped in Python, each
  call attributed to the file that issued it (as in test_ddp_flat.py), and the profiler's
  ``c10d::allreduce_`` ops inside ``train_step``, which also see what DDP's C++ reducer issues
  without Python (its buckets, and with ``find_unused_parameters`` the used-parameter bitmap).
  The task-norm statistics' all-reduces (``norm/sync.py``, activations) are left out.
* fp16 loss scaling on DDP, from the first scale 2**19 (step 1 overflows): the ranks agree bit for
  bit and match the flat path (loss scale, skipped steps, parameters, balancer state: a skipped
  step undoes DWA's step as on flat), and one process on the global batch (same loss scale and
  skipped steps; parameters and balancer state to fp16's tolerance, test_ddp_flat.py).
* A NaN loss, or a non-finite gradient (UW), on rank 1 alone stops both ranks at the same step.
* Learning to Branch declares unused parameters (its frozen tree leaves nodes and logits out of
  the graph): DDP runs with ``find_unused_parameters`` through the freeze after epoch 1 and
  matches one process.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))

from test_ddp_flat import FP16_START, _config, _count_all_reduce, _free_port, _join, assert_close_fp16  # noqa: E402
from train_helpers import toy_config  # noqa: E402

pytestmark = pytest.mark.distributed

# (method, balancer): equal and loss weighting train on DDP under the default, gradient balancers flat
MATCH = [
    ("tssbn", "ew"),
    ("tsbn", "ew"),
    ("tsbn", "uw"),
    ("tssbn", "dwa"),
    ("tssbn", "pcgrad"),
    ("tsbn", "db_mtl"),
]
FP16 = [("tssbn", "ew"), ("tssbn", "uw"), ("tssbn", "dwa")]
LTB = ["ew", "uw"]
NAN = [("loss", "ew"), ("loss", "uw"), ("grad", "uw")]

# per train_step, gradient-sync collectives (norm statistics left out): all-reduces issued in Python
# by the trainer (the loss values of equal weighting) and by train/distributed.py (the loss values
# of loss weighting before the weights, or the flat path's one buffer), and by DDP's reducer in C++
# (buckets: 1 for these toy models, below the 1 MiB of DDP's first bucket; + 1 used-parameter
# bitmap with find_unused_parameters). Every step adds the stop flag (trainer) before train_step.
EXPECTED = {
    "ew": {"trainer": 1, "distributed": 0, "reducer": 1},
    "uw": {"trainer": 0, "distributed": 1, "reducer": 1},
    "dwa": {"trainer": 0, "distributed": 1, "reducer": 1},
    "pcgrad": {"trainer": 0, "distributed": 1, "reducer": 0},
    "db_mtl": {"trainer": 0, "distributed": 1, "reducer": 0},
}
EXPECTED_LTB = {
    "ew": {"trainer": 1, "distributed": 0, "reducer": 2},
    "uw": {"trainer": 0, "distributed": 1, "reducer": 2},
}


def _origin(filename: str) -> str:
    for suffix, name in (
        (("train", "distributed.py"), "distributed"),
        (("train", "trainer.py"), "trainer"),
        (("norm", "sync.py"), "norm"),
    ):
        if filename.endswith(os.path.join(*suffix)):
            return name
    return "other"


def _ltb_config(out: Path, balancer: str):
    # tests/arch/test_cross_stitch.py's toy LTB: 2 epochs of 4 steps, the tree frozen after epoch
    # 1; task-specific norms (synchronized over ranks) so that 2 ranks can match one process
    return toy_config(
        out,
        method="ltb",
        balancer=balancer,
        method_kwargs={"norm": "bn"},
        data={"n_train": 64, "n_test": 32, "batch_size": 16},
        model={"hidden": 8},
        optim={"lr": 0.01, "scheduler": "none"},
    )


def _count_steps(trainer, calls: list[str]) -> list[dict]:
    """Replace ``trainer.train_step`` by one that records, per call, the Python all-reduces by
    origin and the profiler's count of every all-reduce (Python or C++)."""
    from torch.profiler import ProfilerActivity, profile

    steps: list[dict] = []
    original = trainer.train_step

    def counted(index):  # noqa: ANN001, ANN202
        start = len(calls)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = original(index)
        python = Counter(calls[start:])
        total = sum(1 for e in prof.events() if e.name == "c10d::allreduce_")
        steps.append({**python, "reducer": total - sum(python.values())})
        return out

    trainer.train_step = counted
    return steps


def _train(path: Path, cfg, calls: list[str], start_scale: float | None = None) -> dict:
    from mtnorm.train import Trainer

    marks: list[int] = []
    trainer = Trainer(cfg, callbacks=[lambda _t: marks.append(len(calls))], log=None)
    if start_scale is not None:
        trainer.loss_scale.scale = start_scale
    steps = _count_steps(trainer, calls)
    trainer.fit()
    ddp = trainer._ddp_forward
    record = {
        "sync": trainer.grad_sync,
        "find_unused": getattr(ddp, "find_unused_parameters", None),
        "state": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "balancer": trainer.balancer.state_dict() if trainer.balancer is not None else None,
        "steps": steps,
        # all the collectives from one step's end to the next's (stop flag included)
        "between": [Counter(calls[a:b]) for a, b in zip(marks, marks[1:])],
        "scale": (trainer.loss_scale.scale, trainer.loss_scale.skipped),
        "param_bytes": sum(p.numel() * p.element_size() for p in trainer.model.parameters()),
        "frozen": getattr(trainer.model, "frozen", None),
    }
    torch.save(record, path)
    return record


def _nan_run(out: Path, rank: int, kind: str, balancer: str) -> tuple[int, str] | None:
    """Rank 1 alone poisons task 0's loss at step 2: its value (NaN), or its gradient only (the
    value stays finite: ``+ sqrt(0 * l)``, whose gradient is inf * 0)."""
    from mtnorm.train import Trainer, TrainingError

    trainer = Trainer(_config(out / f"nan-{kind}-{balancer}", "tssbn", balancer), log=None)
    task = trainer.tasks[0]
    loss = trainer.losses[task]

    def poisoned(*args, loss=loss):  # noqa: ANN002, ANN202
        value = loss(*args)
        if rank != 1 or trainer.global_step != 2:
            return value
        return value * float("nan") if kind == "loss" else value + torch.sqrt(value * 0)

    trainer.losses[task] = poisoned
    try:
        trainer.fit()
    except TrainingError as e:
        return trainer.global_step, str(e)
    return None


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _join(rank, world, port)
    import torch.distributed as dist

    out_dir = Path(out)
    calls, restore = _count_all_reduce(_origin)
    try:
        runs = [(f"auto-{m}-{b}", None, _config(out_dir / f"auto-{m}-{b}", m, b)) for m, b in MATCH]
        runs.append(("ddp-tssbn-pcgrad", "ddp", _config(out_dir / "ddp-pcgrad", "tssbn", "pcgrad")))
        for m, b in FP16:
            for sync in ("auto", "flat"):
                runs.append(
                    (f"fp16-{sync}-{m}-{b}", sync, _config(out_dir / f"fp16-{sync}-{b}", m, b, "fp16"))
                )
        runs += [(f"ltb-{b}", None, _ltb_config(out_dir / f"ltb-{b}", b)) for b in LTB]
        for label, sync, cfg in runs:
            os.environ.pop("MTNORM_GRAD_SYNC", None)
            if sync is not None:
                os.environ["MTNORM_GRAD_SYNC"] = sync
            start = FP16_START["fp16-x8"] if label.startswith("fp16") else None  # the skip path
            _train(out_dir / f"{label}-rank{rank}.pt", cfg, calls, start)
        os.environ.pop("MTNORM_GRAD_SYNC", None)
        nan = {(kind, b): _nan_run(out_dir, rank, kind, b) for kind, b in NAN}
        torch.save(nan, out_dir / f"nan-rank{rank}.pt")
    finally:
        restore()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_model")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


def _ranks(folder: Path, label: str) -> list[dict]:
    return [torch.load(folder / f"{label}-rank{r}.pt", weights_only=False) for r in range(2)]


def _assert_same(got: dict, want: dict, what: str, exact: bool = False) -> None:
    assert got.keys() == want.keys(), what
    for name, value in want.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not exact:
            torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=f"{what} {name}")
        elif isinstance(value, torch.Tensor):
            assert torch.equal(got[name], value), f"{what} {name}"
        elif isinstance(value, dict):
            _assert_same(got[name], value, f"{what} {name}", exact)
        else:
            assert got[name] == value, f"{what} {name}"


def _assert_ranks_equal_and_match(ranks: list[dict], single, what: str) -> None:
    _assert_same(ranks[1]["state"], ranks[0]["state"], f"{what}: ranks differ", exact=True)
    _assert_same(ranks[0]["state"], single.model.state_dict(), what)
    if single.balancer is not None:
        _assert_same(ranks[1]["balancer"], ranks[0]["balancer"], f"{what}: ranks differ", exact=True)
        _assert_same(ranks[0]["balancer"], single.balancer.state_dict(), f"{what} balancer")


def _assert_collectives(record: dict, expected: dict[str, int]) -> None:
    assert len(record["steps"]) == len(record["between"]) + 1
    for step in record["steps"]:
        assert {k: step.get(k, 0) for k in expected} == expected, step
        assert step.get("other", 0) == 0, step
    for step in record["between"]:  # train_step's, plus the stop flag
        assert step.get("trainer", 0) == expected["trainer"] + 1, step
        assert step.get("distributed", 0) == expected["distributed"], step


@pytest.mark.parametrize(("method", "balancer"), MATCH)
def test_default_sync_matches_one_process(spawned, method, balancer):
    from mtnorm.train import Trainer

    ranks = _ranks(spawned, f"auto-{method}-{balancer}")
    assert ranks[0]["sync"] == ("flat" if balancer in ("pcgrad", "db_mtl") else "ddp")
    single = Trainer(_config(spawned / "single" / f"{method}-{balancer}", method, balancer), log=None)
    single.fit()
    _assert_ranks_equal_and_match(ranks, single, f"{method}/{balancer}")


@pytest.mark.parametrize(("method", "balancer"), MATCH)
def test_collectives_per_step(spawned, method, balancer):
    record = _ranks(spawned, f"auto-{method}-{balancer}")[0]
    assert len(record["steps"]) == 4
    _assert_collectives(record, EXPECTED[balancer])
    if record["sync"] == "ddp":  # one bucket: the model is below DDP's first bucket (1 MiB)
        assert record["param_bytes"] < torch.distributed._DEFAULT_FIRST_BUCKET_BYTES


def test_explicit_ddp_with_a_gradient_balancer_falls_back_to_flat(spawned):
    ranks = _ranks(spawned, "ddp-tssbn-pcgrad")
    auto = _ranks(spawned, "auto-tssbn-pcgrad")
    assert ranks[0]["sync"] == "flat" and ranks[0]["find_unused"] is None
    _assert_collectives(ranks[0], EXPECTED["pcgrad"])
    _assert_same(ranks[0]["state"], auto[0]["state"], "ddp -> flat", exact=True)


@pytest.mark.parametrize(("method", "balancer"), FP16)
def test_ddp_keeps_fp16_loss_scaling(spawned, method, balancer):
    """fp16 with the dynamic loss scale on DDP: the parameter hooks unscale each gradient before
    DDP's reducer copies it into its bucket; an overflow (non-finite averaged gradients, the same
    on every rank) skips the step on all ranks and undoes the balancer's step. Same loss scale,
    skipped steps, parameters and balancer state as the flat path, and as one process."""
    from mtnorm.train import Trainer

    ranks = _ranks(spawned, f"fp16-auto-{method}-{balancer}")
    flat = _ranks(spawned, f"fp16-flat-{method}-{balancer}")[0]
    assert ranks[0]["sync"] == "ddp" and flat["sync"] == "flat"
    assert ranks[0]["scale"] == ranks[1]["scale"] == flat["scale"]
    assert ranks[0]["scale"][1] >= 1  # the skip path ran
    _assert_collectives(ranks[0], EXPECTED[balancer])
    _assert_same(ranks[1]["state"], ranks[0]["state"], "ranks differ", exact=True)
    _assert_same(ranks[0]["state"], flat["state"], f"fp16 {balancer}")
    if flat["balancer"] is not None:
        _assert_same(ranks[1]["balancer"], ranks[0]["balancer"], "ranks differ", exact=True)
        _assert_same(ranks[0]["balancer"], flat["balancer"], f"fp16 {balancer} balancer")
    single = Trainer(_config(spawned / "single" / f"fp16-{balancer}", method, balancer, "fp16"), log=None)
    single.loss_scale.scale = FP16_START["fp16-x8"]
    single.fit()
    assert ranks[0]["scale"] == (single.loss_scale.scale, single.loss_scale.skipped)
    for name, value in single.model.state_dict().items():
        if value.is_floating_point():
            assert_close_fp16(ranks[0]["state"][name], value, f"fp16 {balancer} {name}")
        else:
            assert torch.equal(ranks[0]["state"][name], value), name
    if single.balancer is not None:
        _assert_close_fp16_nested(
            ranks[0]["balancer"], single.balancer.state_dict(), f"fp16 {balancer} balancer"
        )


def _assert_close_fp16_nested(got, want, what: str) -> None:  # noqa: ANN001
    """``assert_close_fp16`` on the float tensors of a (nested) state dict, equality elsewhere."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), what
        for name, value in want.items():
            _assert_close_fp16_nested(got[name], value, f"{what} {name}")
    elif isinstance(want, torch.Tensor) and want.is_floating_point():
        assert_close_fp16(got, want, what)
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got, want), what
    else:
        assert got == want, what


@pytest.mark.parametrize(("kind", "balancer"), NAN)
def test_a_non_finite_value_on_one_rank_stops_every_rank(spawned, kind, balancer):
    """The checks run on averaged values: the loss values (averaged before the weights, or with
    the trainer's loss all-reduce for equal weighting) and the gradients DDP averaged."""
    message = {"loss": "non-finite loss for task", "grad": "non-finite gradient of the weighted loss"}[kind]
    for r in range(2):
        step, text = torch.load(spawned / f"nan-rank{r}.pt")[(kind, balancer)]
        assert step == 2, text
        assert message in text, text


@pytest.mark.parametrize("balancer", LTB)
def test_ltb_trains_on_ddp_with_unused_parameters_after_the_freeze(spawned, balancer):
    from mtnorm.train import Trainer

    ranks = _ranks(spawned, f"ltb-{balancer}")
    assert ranks[0]["sync"] == "ddp" and ranks[0]["find_unused"] is True
    assert ranks[0]["frozen"] is True
    assert len(ranks[0]["steps"]) == 8  # 4 searching, 4 on the frozen tree
    _assert_collectives(ranks[0], EXPECTED_LTB[balancer])
    single = Trainer(_ltb_config(spawned / "single" / f"ltb-{balancer}", balancer), log=None)
    single.fit()
    _assert_ranks_equal_and_match(ranks, single, f"ltb/{balancer}")
    # the case exercises unused parameters: the frozen tree's logits get no gradient in epoch 2.
    # DDP leaves the .grad of a parameter no rank used as it is (None), so Adam skips it as in one
    # process; a zero gradient would move it with Adam's momentum and break the match above
    assert all(p.grad is None for p in single.model.logits)


def test_modules_declare_unused_parameters_for_ddp():
    from torch import nn

    from mtnorm.arch.ltb import LearningToBranch
    from mtnorm.train import ddp_model

    assert LearningToBranch.ddp_find_unused_parameters is True
    plain = nn.Sequential(nn.Linear(2, 2))
    assert not ddp_model.declares_unused_parameters(plain)

    class Partial(nn.Module):
        ddp_find_unused_parameters = True

    assert ddp_model.declares_unused_parameters(nn.Sequential(nn.Linear(2, 2), Partial()))


def test_the_default_sync_resolves_by_what_the_balancer_combines(monkeypatch):
    from mtnorm.train import distributed

    monkeypatch.delenv("MTNORM_GRAD_SYNC", raising=False)
    assert distributed.grad_sync() == "auto"
    resolved = {
        (requested, grads): distributed.resolve_grad_sync(requested, grads)
        for requested in distributed.GRAD_SYNCS
        for grads in (False, True)
    }
    assert resolved == {
        ("auto", False): "ddp",
        ("auto", True): "flat",
        ("ddp", False): "ddp",
        ("ddp", True): "flat",
        ("flat", False): "flat",
        ("flat", True): "flat",
        ("hooks", False): "hooks",
        ("hooks", True): "hooks",
    }
    monkeypatch.setenv("MTNORM_GRAD_SYNC", "nccl")
    with pytest.raises(ValueError, match="choose one of"):
        distributed.grad_sync()
