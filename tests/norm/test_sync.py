"""Per-task synchronized batch norm (``mtnorm.convert_sync``) on 2 CPU processes (gloo).

The reference is ONE process running the same converted model *without* synchronization on the
concatenated batch of both processes. In float64, outputs, input gradients, parameter gradients
(summed over the processes, i.e. before DDP's averaging) and running statistics after a training
step must agree to ``rtol=1e-9, atol=1e-10`` (they differ only by the order of floating-point
sums), in sequential (``use_task``) and batched passes, for TSBN, TSσBN, DW-BN and AdaIN-BN.
The two processes hold batches of different sizes (3 and 5), which checks that statistics are
weighted by count. A double backward (the gradient of a gradient penalty) agrees too. In the same passes,
``torch.distributed``'s collectives are wrapped and counted: each layer issues exactly one in
forward (an all-gather) and one in backward (an all-reduce) per pass.

Also on 2 processes: float32 data with a large common offset (1e4 + noise), where the naive
``E[x^2] - mean^2`` loses every digit, still give the one-process variance; and under autocast
fp16 with a loss scale of 2**16, TSBN and TSσBN give the native one-process layer's gradients to
fp16 rounding (issue 12: the backward of a half ``rsqrt(var + eps)`` overflowed).
"""

from __future__ import annotations

import copy
import datetime
import socket
import warnings
from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mtnorm
from mtnorm.norm import _stats
from mtnorm.norm.sync import _SyncStats

pytestmark = pytest.mark.distributed

TASKS = ["seg", "depth", "normal"]
WORLD = 2
SHARDS = (3, 5)  # per-process batch sizes; the reference runs on all 8 samples
TOL = {"rtol": 1e-9, "atol": 1e-10}
# (norm, convert kwargs) pairs run in every mode
CASES = [
    ("bn", {}),
    ("bn", {"share_stats": True}),
    ("sigma", {"shift": True}),
    ("sigma", {"share_stats": True}),
    ("dw", {}),
    ("adain", {}),
]
MODES = ["sequential", "batched"]


class Net(nn.Module):
    """2D and 1D batch norms (spatial and ``[N, C]`` inputs), one with the cumulative average."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5, momentum=0.3)
        self.fc = nn.Linear(5, 3)
        self.bn3 = nn.BatchNorm1d(3, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x)).mean(dim=(2, 3))
        return self.bn3(self.fc(x))


def _model(norm: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    model = Net().double()
    model = mtnorm.convert(model, TASKS, norm=norm, **kwargs)
    with torch.no_grad():  # move every task's parameters and statistics off their identical init
        for name, p in model.named_parameters():
            if not name.startswith(("conv", "fc")):
                p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(1 + 0.2 * torch.rand_like(b))
            elif name.endswith("num_batches_tracked"):
                b.fill_(3)
    return model.train()


def _data() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    n = sum(SHARDS)
    x = torch.randn(n, 3, 5, 5, dtype=torch.float64, generator=g) * 2 + 0.5
    # random loss weights per task, so the input gradients of batch norm are not trivially 0
    w = {t: torch.randn(n, 3, dtype=torch.float64, generator=g) for t in TASKS}
    return x, w


def _run(model: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor], mode: str, between=lambda: None):
    """Outputs per task and the gradient of ``sum_t <out_t, w_t>`` w.r.t. x and the parameters;
    ``between()`` is called after the forward passes, before the backward."""
    x = x.detach().clone().requires_grad_(True)
    if mode == "sequential":
        out = {}
        for task in TASKS:
            with mtnorm.use_task(model, task):
                out[task] = model(x)
    else:
        out = mtnorm.forward_tasks(model, x, mode="batched")
    between()
    loss = sum((out[t] * w[t]).sum() for t in TASKS)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return {t: o.detach() for t, o in out.items()}, x.grad.detach(), grads


def _penalty_grads(model: nn.Module, x: torch.Tensor, w: dict[str, torch.Tensor]):
    """Gradient w.r.t. the parameters of ``|d loss / dx|^2`` (sequential passes): a double backward."""
    x = x.detach().clone().requires_grad_(True)
    out = {}
    for task in TASKS:
        with mtnorm.use_task(model, task):
            out[task] = model(x)
    loss = sum((out[t] * w[t]).sum() for t in TASKS)
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(gx.square().sum(), list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _check(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


# every collective a layer could issue; all are counted, so a stray one fails the count check
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "gather",
    "scatter",
)


def _count_collectives() -> tuple[list[str], Callable[[], None]]:
    """Wrap the ``torch.distributed`` collectives so that each call appends its name to the returned
    list; returns ``(calls, restore)``."""
    calls: list[str] = []
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, original):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return original(*args, **kwargs)

        return wrapped

    for name, original in originals.items():
        setattr(dist, name, counting(name, original))

    def restore() -> None:
        for name, original in originals.items():
            setattr(dist, name, original)

    return calls, restore


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )


def _worker(rank: int, port: int) -> None:
    _init(rank, port)
    calls, restore = _count_collectives()
    try:
        x, w = _data()
        lo, hi = sum(SHARDS[:rank]), sum(SHARDS[: rank + 1])
        for norm, kwargs in CASES:
            for mode in MODES:
                tag = f"rank {rank}, norm={norm} {kwargs}, mode={mode}"
                ref = _model(norm, kwargs)  # one process, concatenated batch, no sync
                sync = mtnorm.convert_sync(copy.deepcopy(ref))
                layers = sum(isinstance(m, _SyncStats) for m in sync.modules())
                assert layers == 3
                marks = [len(calls)]
                with warnings.catch_warnings():
                    warnings.simplefilter("error", FutureWarning)  # no deprecated collectives
                    shard = {t: v[lo:hi] for t, v in w.items()}
                    between = lambda marks=marks: marks.append(len(calls))  # noqa: E731
                    out, gx, grads = _run(sync, x[lo:hi], shard, mode, between)
                marks.append(len(calls))
                # one collective per layer and pass each way; a batched pass covers every task
                passes = len(TASKS) if mode == "sequential" else 1
                forward, backward = (Counter(calls[a:b]) for a, b in zip(marks, marks[1:]))
                assert forward == {"all_gather": layers * passes}, f"{tag}: forward {forward}"
                assert backward == {"all_reduce": layers * passes}, f"{tag}: backward {backward}"
                ref_out, ref_gx, ref_grads = _run(ref, x, w, mode)
                for t in TASKS:
                    _check(f"{tag}: output of {t}", out[t], ref_out[t][lo:hi])
                _check(f"{tag}: input gradient", gx, ref_gx[lo:hi])
                for name, grad in grads.items():
                    dist.all_reduce(grad)  # what DDP sums (then averages) over processes
                    _check(f"{tag}: gradient of {name}", grad, ref_grads[name])
                ref_buffers = dict(ref.named_buffers())
                for name, buf in sync.named_buffers():
                    _check(f"{tag}: buffer {name}", buf, ref_buffers[name])
                # eval mode normalizes with the (equal) running statistics, without communication
                sync.eval()
                ref.eval()
                with torch.no_grad(), mtnorm.use_task(sync, TASKS[1]), mtnorm.use_task(ref, TASKS[1]):
                    _check(f"{tag}: eval output", sync(x[lo:hi]), ref(x)[lo:hi])
            # double backward, sequential only: the reference's batched kernels are once differentiable
            ref = _model(norm, kwargs)
            sync = mtnorm.convert_sync(copy.deepcopy(ref))
            grads = _penalty_grads(sync, x[lo:hi], {t: v[lo:hi] for t, v in w.items()})
            ref_grads = _penalty_grads(ref, x, w)
            for name, grad in grads.items():
                dist.all_reduce(grad)
                _check(f"rank {rank}, norm={norm} {kwargs}: double backward, {name}", grad, ref_grads[name])

        # without running statistics, eval mode uses each process's local batch (as nn.SyncBatchNorm
        # does), so an evaluation on one rank only cannot hang
        local = mtnorm.TaskBatchNorm(3, TASKS, track_running_stats=False).double().eval()
        synced = mtnorm.convert_sync(copy.deepcopy(local))
        xs = x[lo:hi, :, :, 0]
        with mtnorm.use_task(local, "depth"), mtnorm.use_task(synced, "depth"):
            _check(f"rank {rank}: eval without running stats", synced(xs), local(xs))
        if rank == 0:  # rank 1 does not take part: must not block
            with mtnorm.use_task(synced, "seg"):
                synced(xs)
        dist.barrier()
    finally:
        restore()
        dist.destroy_process_group()


OFFSET = 1e4
# float32 rounds each process's mean m_i to within ulp(1e4) / 2 = 4.9e-4, which perturbs the
# between-process term n_i (m_i - mean)^2. Measured max relative error of the variance over the 16
# channels (noise of unit variance): 9.6e-5 (one process: 5.6e-8, as CPU reductions of float32
# accumulate in float64); the naive E[x^2] - mean^2 from the same float32 data: 22 to 31.
OFFSET_RTOL = 1e-3


def _offset_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        g = torch.Generator().manual_seed(2)
        c = 16
        x = (OFFSET + torch.randn(sum(SHARDS), c, 4, 4, generator=g, dtype=torch.float64)).float()
        lo, hi = sum(SHARDS[:rank]), sum(SHARDS[: rank + 1])
        for chunks in (1, len(TASKS)):  # one task pass, and a batched pass over every task
            # task t sees its own copy of the batch, shifted by t so that the chunks differ
            batch = torch.cat([x + t for t in range(chunks)])
            layer = mtnorm.convert_sync(mtnorm.TaskBatchNorm(c, TASKS)).train()
            local = mtnorm.TaskBatchNorm(c, TASKS).train()
            # the layout of a batch of `chunks` tasks, each chunk holding this process's samples
            xs = _stats.chunk_view(batch.view(chunks, -1, c, 4, 4)[:, lo:hi].reshape(-1, c, 4, 4), chunks, c)
            var, mean, count = layer._batch_moments(xs)
            ref_var, ref_mean, ref_count = local._batch_moments(_stats.chunk_view(batch, chunks, c))
            assert count == ref_count == sum(SHARDS) * 16
            assert var.dtype == mean.dtype == torch.float32
            torch.testing.assert_close(var, ref_var, rtol=OFFSET_RTOL, atol=0)
            torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=0)
            # the exact variance of these float32 values agrees as well
            xs64 = _stats.chunk_view(batch.double(), chunks, c)
            exact = xs64.var(dim=(1, 3), correction=0)
            torch.testing.assert_close(var.double(), exact, rtol=OFFSET_RTOL, atol=0)
            # the naive E[x^2] - mean^2 in float32, on the same data, misses by far more
            full = _stats.chunk_view(batch, chunks, c)
            m = full.mean(dim=(1, 3))
            naive = full.square().mean(dim=(1, 3)) - m.square()
            assert ((naive.double() - exact).abs() / exact).max() > 100 * OFFSET_RTOL
        dist.barrier()
    finally:
        dist.destroy_process_group()


FP16_SCALE = 2.0**16  # the dynamic loss scale's first value
FP16_BATCH = 64  # 32 per process, as the toy global batch of tests/train/test_ddp_flat.py
# x.grad (fp16) to 1e-3 of its largest element + 2e-3 relative: each path rounds its float32
# result to half once (2**-11 = 4.9e-4 of an element); measured max error 1.7e-4 of the largest.
# Cast to half before adding its two terms (affine and statistics, which nearly cancel here), the
# sync layer missed by 1.5e-2 of the largest; in half precision throughout, it was inf.
FP16_GX = {"rtol": 2e-3, "atol_of_max": 1e-3}


def _fp16_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Half activations ``[64, 16]`` with the spread of the toy model's second norm at step 1
    (std 0.11: ``rsqrt(var + eps)`` about 9), and the upstream gradient of a loss scaled by 2**16
    that the normalization mostly cancels: affine in the normalized input, plus 5% noise."""
    g = torch.Generator().manual_seed(3)
    x = (0.3 + 0.11 * torch.randn(FP16_BATCH, 16, generator=g)).half()
    z = (x.float() - x.float().mean(0)) / x.float().std(0)
    w = (2 * z + 1 + 0.05 * torch.randn(FP16_BATCH, 16, generator=g)) * (FP16_SCALE / FP16_BATCH)
    return x, w


def _fp16_run(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, mode: str):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = mtnorm.forward_tasks(layer, x, mode=mode)
    # through half, as into the next layer's fp16 matmul: both layers get the same fp16 gradient
    loss = sum((o.half().float() * w).sum() for o in out.values())
    layer.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in layer.named_parameters()}
    return {t: o.detach() for t, o in out.items()}, x.grad, grads


def _fp16_worker(rank: int, port: int) -> None:
    _init(rank, port)
    try:
        x, w = _fp16_data()
        lo, hi = rank * FP16_BATCH // WORLD, (rank + 1) * FP16_BATCH // WORLD
        for cls in (mtnorm.TaskBatchNorm, mtnorm.TaskSigmoidBatchNorm):
            for mode in MODES:
                tag = f"rank {rank}, {cls.__name__}, mode={mode}"
                ref = cls(16, TASKS).train()  # one process, native kernels, concatenated batch
                sync = mtnorm.convert_sync(copy.deepcopy(ref))
                out, gx, grads = _fp16_run(sync, x[lo:hi], w[lo:hi], mode)
                ref_out, ref_gx, ref_grads = _fp16_run(ref, x, w, mode)
                assert gx.dtype == torch.float16 and bool(torch.isfinite(gx).all()), tag
                for t in TASKS:  # the native output is half: 1 ulp = 4.9e-4 relative
                    assert out[t].dtype == ref_out[t].dtype == torch.float16, tag
                    torch.testing.assert_close(
                        out[t].float(), ref_out[t][lo:hi].float(), rtol=1e-3, atol=1e-3, msg=tag
                    )
                atol = FP16_GX["atol_of_max"] * ref_gx.abs().max().item()
                torch.testing.assert_close(
                    gx,
                    ref_gx[lo:hi],
                    rtol=FP16_GX["rtol"],
                    atol=atol,
                    msg=lambda m, tag=tag: f"{tag}: x.grad: {m}",
                )
                for name, grad in grads.items():  # float32 of the same half gradient: 4.2e-7
                    dist.all_reduce(grad)
                    atol = 1e-5 * ref_grads[name].abs().max().item()
                    torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=atol, msg=tag)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_matches_one_process_on_concatenated_batch():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_unequal_shards_with_large_offset_match_one_process_variance():
    mp.spawn(_offset_worker, args=(_free_port(),), nprocs=WORLD, join=True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fp16_loss_scaled_backward_matches_one_process():
    """Under CPU autocast fp16 with a gradient scaled by 2**16 (issue 12), a synchronized TSBN or
    TSσBN on 2 processes gives the input and parameter gradients of the native layer on the
    concatenated batch: finite, and to fp16 rounding."""
    mp.spawn(_fp16_worker, args=(_free_port(),), nprocs=WORLD, join=True)


@pytest.mark.parametrize("norm,kwargs", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_without_process_group_sync_layers_are_local(norm, kwargs, mode):
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    local = _model(norm, kwargs)
    sync = mtnorm.convert_sync(copy.deepcopy(local))
    x, w = _data()
    out, gx, grads = _run(sync, x, w, mode)
    ref_out, ref_gx, ref_grads = _run(local, x, w, mode)
    for t in TASKS:
        _check(f"output of {t}", out[t], ref_out[t])
    _check("input gradient", gx, ref_gx)
    for name, grad in grads.items():
        _check(f"gradient of {name}", grad, ref_grads[name])
    ref_buffers = dict(local.named_buffers())
    for name, buf in sync.named_buffers():
        _check(f"buffer {name}", buf, ref_buffers[name])


def test_convert_sync_keeps_parameters_and_buffers():
    # a TaskLayerNorm is not a batch norm: convert_sync leaves it alone
    model = nn.Sequential(_model("sigma", {"shift": True}), mtnorm.TaskLayerNorm(3, TASKS).double())
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    assert mtnorm.convert_sync(model, process_group=None) is model
    assert list(dict(model.named_parameters())) == list(params)
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(buffers[n] is b for n, b in model.named_buffers())
    bn1 = model[0].bn1
    assert type(bn1) is mtnorm.TaskSigmoidSyncBatchNorm
    assert type(model[1]) is mtnorm.TaskLayerNorm
    assert bn1.process_group is None

    # the optimizer built before the conversion updates the converted model's parameters
    before = bn1.gamma.detach().clone()
    x, w = _data()
    _run(model, x, w, "sequential")
    opt.step()
    assert not torch.equal(bn1.gamma, before)

    # converting twice is a no-op
    mtnorm.convert_sync(model)
    assert type(model[0].bn1) is mtnorm.TaskSigmoidSyncBatchNorm


def test_convert_sync_class_map_and_unknown_subclass():
    for norm, cls in [
        ("bn", mtnorm.TaskSyncBatchNorm),
        ("sigma", mtnorm.TaskSigmoidSyncBatchNorm),
        ("dw", mtnorm.DynamicWeightedSyncBatchNorm),
        ("adain", mtnorm.AdaINSyncBatchNorm),
    ]:
        model = mtnorm.convert_sync(_model(norm, {}))
        assert {type(m) for m in model.modules() if isinstance(m, mtnorm.TaskNorm)} == {cls}

    class Custom(mtnorm.TaskBatchNorm):
        pass

    with pytest.raises(TypeError, match="no synchronized variant of Custom"):
        mtnorm.convert_sync(nn.Sequential(Custom(3, TASKS)))
