"""Tensor helpers shared by the batch-norm family: per-chunk statistics and running updates.

A batched multi-task pass stacks T task chunks along the batch: ``x`` has shape
``[T*B, C, *S]``. Viewing it as ``[T, B, C, L]`` (``L = prod(S)``) is free for contiguous
inputs, and every per-task statistic is then one reduction over dims ``(1, 3)``, so no layer
loops over tasks.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch


def check_chunks(x: torch.Tensor, chunks: int, num_features: int) -> int:
    """Check that ``x`` is ``[K*B, C, ...]`` with ``K = chunks``, ``C = num_features``; returns B."""
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape [N, C, ...], got shape {tuple(x.shape)}")
    if x.shape[1] != num_features:
        raise ValueError(
            f"expected {num_features} channels in dim 1, got input of shape {tuple(x.shape)}"
        )
    if x.shape[0] % chunks:
        raise ValueError(
            f"a batched multi-task pass needs a batch divisible by the {chunks} tasks, "
            f"got batch size {x.shape[0]}"
        )
    return x.shape[0] // chunks


def chunk_view(x: torch.Tensor, chunks: int, num_features: int) -> torch.Tensor:
    """View ``x`` of shape ``[K*B, C, *S]`` as ``[K, B, C, L]`` (a copy only if non-contiguous)."""
    return x.reshape(chunks, check_chunks(x, chunks, num_features), num_features, -1)


def chunk_moments(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean of each chunk and channel of ``xs = [K, B, C, L]``: two ``[K, C]``."""
    return torch.var_mean(xs, dim=(1, 3), correction=0)


def affine_apply(xs: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``xs * scale + shift`` with per-(chunk, channel) coefficients ``[K, C]``, one fused op."""
    return torch.addcmul(shift[:, None, :, None], xs, scale[:, None, :, None])


def normalizing_affine(
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``weight * (x - mean) / sqrt(var + eps) + bias`` into ``x * scale + shift``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


@torch.no_grad()
def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float | None,
) -> None:
    """Update running statistics in place exactly as ``F.batch_norm`` would, one task pass at a time.

    ``mean``/``var`` (biased) are ``[K, C]``: one row per task pass of ``count`` values per channel.
    When ``running_mean`` has K rows each row gets its own pass (task-specific statistics). When it
    has one row, the K passes are applied in task order as K consecutive updates, in closed form:
    with momentum m, ``r <- (1-m)^K r + sum_k m (1-m)^(K-1-k) mu_k``; with ``momentum=None`` (the
    cumulative average), ``r <- (n r + sum_k mu_k) / (n + K)`` where n is the count so far.
    The variance is stored unbiased (factor ``count / (count - 1)``), as PyTorch does.
    """
    unbiased = var * (count / max(count - 1, 1))
    k = mean.shape[0]
    if running_mean.shape[0] == k:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = (1.0 / num_batches_tracked.to(mean.dtype))[:, None]
        else:
            factor = torch.full_like(mean[:, :1], momentum)
        running_mean.lerp_(mean.to(running_mean.dtype), factor.to(running_mean.dtype))
        running_var.lerp_(unbiased.to(running_var.dtype), factor.to(running_var.dtype))
        return
    # one shared row, K sequential updates
    if momentum is None:
        n = float(num_batches_tracked.item())
        decay = n / (n + k)
        coef = torch.full((k,), 1.0 / (n + k), dtype=mean.dtype, device=mean.device)
    else:
        decay = (1.0 - momentum) ** k
        powers = torch.arange(k - 1, -1, -1, dtype=mean.dtype, device=mean.device)
        coef = momentum * (1.0 - momentum) ** powers
    num_batches_tracked.add_(k)
    running_mean.mul_(decay).add_((coef @ mean).to(running_mean.dtype))
    running_var.mul_(decay).add_((coef @ unbiased).to(running_var.dtype))


class _NativeChunks(torch.autograd.Function):
    """T native batch-norm kernels, one per contiguous chunk, writing into one output tensor.

    Forward runs ``aten.native_batch_norm.out`` on chunk t with task t's affine row and running
    buffers (updated in place, in task order, as T sequential passes update them); backward runs
    ``aten.native_batch_norm_backward.out`` per chunk into one input-gradient tensor and one
    ``[K, C]`` gradient per affine parameter. Compared with ``torch.cat`` of T ``F.batch_norm``
    calls this saves a copy of the output and one of the input gradient; compared with one
    reduction over ``[K, B, C, L]`` it keeps the native kernels' single passes and their rounding.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running, momenta, training, eps, chunks):  # type: ignore[override]
        y = torch.empty_like(x)
        xs, ys = x.split(chunks), y.split(chunks)
        stats = []
        # the kernel keeps the saved statistics in the input's accumulation type: float32 for
        # bfloat16/float16 inputs (autocast), the input's own dtype otherwise
        stat_dtype = _accumulation_dtype(x.dtype)
        for t, (xc, yc) in enumerate(zip(xs, ys)):
            rm, rv = running[t]
            save_mean = x.new_empty(0, dtype=stat_dtype)
            save_invstd = x.new_empty(0, dtype=stat_dtype)
            torch.ops.aten.native_batch_norm.out(
                xc,
                None if weight is None else weight[t],
                None if bias is None else bias[t],
                rm,
                rv,
                training,
                momenta[t],
                eps,
                out=yc,
                save_mean=save_mean,
                save_invstd=save_invstd,
            )
            stats += [save_mean, save_invstd]
        ctx.training, ctx.eps, ctx.chunks = training, eps, chunks
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        # eval mode normalizes with the running statistics, which backward reads again
        saved_running = [] if training else [r for pair in running for r in pair]
        ctx.save_for_backward(x, weight, *stats, *saved_running)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # type: ignore[override]
        x, weight, *rest = ctx.saved_tensors
        k = x.shape[0] // ctx.chunks
        stats, running = rest[: 2 * k], rest[2 * k :]
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_x or need_w or need_b):
            return (None,) * 8
        # the out= overload wants every output defined, so all three are computed (the parameter
        # gradients are [K, C] by-products of the input gradient's reductions)
        gys, xs = grad_y.split(ctx.chunks), x.split(ctx.chunks)

        def args(t: int) -> tuple:
            rm, rv = (None, None) if ctx.training else (running[2 * t], running[2 * t + 1])
            w = None if weight is None else weight[t]
            return (gys[t], xs[t], w, rm, rv, stats[2 * t], stats[2 * t + 1], ctx.training, ctx.eps)

        try:
            grad_x = torch.empty_like(x)
            param_dtype = weight.dtype if weight is not None else _accumulation_dtype(x.dtype)
            grad_w = x.new_empty(k, x.shape[1], dtype=param_dtype)
            grad_b = x.new_empty(k, x.shape[1], dtype=param_dtype)
            gxs = grad_x.split(ctx.chunks)
            for t in range(k):
                torch.ops.aten.native_batch_norm_backward.out(
                    *args(t), [True, True, True], out0=gxs[t], out1=grad_w[t], out2=grad_b[t]
                )
        except RuntimeError:
            # under vmap (``autograd.grad(..., is_grads_batched=True)``) out= variants have no
            # batching rule; the functional kernel has one
            parts = [
                torch.ops.aten.native_batch_norm_backward(*args(t), [True, True, True])
                for t in range(k)
            ]
            grad_x = torch.cat([p[0] for p in parts])
            grad_w = torch.stack([p[1] for p in parts])
            grad_b = torch.stack([p[2] for p in parts])
        return (
            grad_x if need_x else None,
            grad_w if need_w and ctx.has_weight else None,
            grad_b if need_b and ctx.has_bias else None,
            None, None, None, None, None,
        )


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def full_precision(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run a norm's ``forward(self, x, *args)`` on ``x`` cast up to float32 when it is half or
    bfloat16, with autocast off, and return the input's dtype: the precision the native batch-norm
    kernel computes in (float32 moments and inverse deviation, one rounding of the output).

    In half, the moments of activations whose magnitude exceeds 256 overflow (``x^2 > 65504``:
    DW-BN's output was NaN for std 300) and lose digits below it (AdaIN-BN was off by 4 on
    unit-scale outputs), and autocast would run DW-BN's mixing matmul of the statistics in half.
    """

    @functools.wraps(forward)
    def wrapper(self: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
        dtype = x.dtype
        device = x.device.type
        off = torch.is_autocast_enabled(device) if device in ("cpu", "cuda", "mps", "xpu") else False
        with torch.autocast(device, enabled=False) if off else contextlib.nullcontext():
            return forward(self, x.to(_accumulation_dtype(dtype)), *args).to(dtype)

    return wrapper


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def native_chunks_batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running: list[tuple[torch.Tensor | None, torch.Tensor | None]],
    momenta: list[float],
    training: bool,
    eps: float,
) -> torch.Tensor:
    """Batch-normalize the K equal chunks of ``x = [K*B, C, *S]`` along dim 0, chunk t with row t
    of ``weight``/``bias`` ``[K, C]``, running buffers ``running[t]`` (1-D views, or None) and
    ``momenta[t]``; exactly K native ``F.batch_norm`` calls, in one autograd node."""
    k = len(running)
    x = x.contiguous(memory_format=_memory_format(x))
    return _NativeChunks.apply(x, weight, bias, running, momenta, training, eps, x.shape[0] // k)
