"""Tensor helpers shared by the batch-norm family: per-chunk statistics and running updates.

A batched multi-task pass stacks T task chunks along the batch: ``x`` has shape
``[T*B, C, *S]``. Viewing it as ``[T, B, C, L]`` (``L = prod(S)``) is free for contiguous
inputs, and every per-task statistic is then one reduction over dims ``(1, 3)``, so no layer
loops over tasks.
"""

from __future__ import annotations

import torch


def chunk_view(x: torch.Tensor, chunks: int, num_features: int) -> torch.Tensor:
    """View ``x`` of shape ``[K*B, C, *S]`` as ``[K, B, C, L]`` (a copy only if non-contiguous)."""
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
    return x.reshape(chunks, x.shape[0] // chunks, num_features, -1)


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


class _ChunkBatchNorm(torch.autograd.Function):
    """Batch normalization of every chunk of ``xs = [K, B, C, L]`` with its own batch statistics.

    Backward uses batch norm's closed-form input gradient instead of differentiating through
    ``var_mean`` step by step: with ``x̂ = (x - μ) r``, ``r = 1/sqrt(σ² + ε)`` and n values per
    (chunk, channel),

        dL/dx = w r (g - Σg / n - x̂ Σ(g x̂) / n),

    evaluated on the saved ``x̂`` (not on x and μ separately), which keeps the rounding of
    PyTorch's native batch-norm backward: autograd through the statistics loses several digits in
    float32 where the terms nearly cancel.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(xs, weight, bias, eps):  # type: ignore[override]
        var, mean = torch.var_mean(xs, dim=(1, 3), correction=0)
        rstd = torch.rsqrt(var + eps)
        xhat = (xs - mean[:, None, :, None]).mul_(rstd[:, None, :, None])
        if weight is None and bias is None:
            y = xhat.clone()
        elif weight is None:
            y = xhat + bias[:, None, :, None]
        elif bias is None:
            y = xhat * weight[:, None, :, None]
        else:
            y = torch.addcmul(bias[:, None, :, None], xhat, weight[:, None, :, None])
        return y, xhat, mean, var, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        _, weight, bias, _ = inputs
        _, xhat, mean, var, rstd = output
        ctx.save_for_backward(xhat, weight, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(xhat, mean, var, rstd)

    @staticmethod
    def backward(ctx, grad_y, *_):  # type: ignore[override]
        xhat, weight, rstd = ctx.saved_tensors
        n = xhat.shape[1] * xhat.shape[3]
        sum_g = grad_y.sum(dim=(1, 3))
        sum_g_xhat = (grad_y * xhat).sum(dim=(1, 3))
        grad_x = None
        if ctx.needs_input_grad[0]:
            k1 = rstd if weight is None else weight * rstd
            k2 = -k1 * sum_g_xhat / n
            k3 = -k1 * sum_g / n
            grad_x = torch.addcmul(k3[:, None, :, None], grad_y, k1[:, None, :, None])
            grad_x.addcmul_(xhat, k2[:, None, :, None])
        grad_w = sum_g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = sum_g if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def chunk_batch_norm(
    xs: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize each chunk of ``xs = [K, B, C, L]`` with its batch statistics and affine ``[K, C]``.

    Returns the output and the (detached) biased variance and mean ``[K, C]`` for running updates.
    """
    y, _, mean, var, _ = _ChunkBatchNorm.apply(xs, weight, bias, eps)
    return y, var, mean
