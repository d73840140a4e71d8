"""Shared LoRA adapters on a small hand-built transformer, with task σLN (no timm needed)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import mtnorm
from mtnorm.models import build_method
from mtnorm.models.lora import LoRALinear, add_lora, lora_parameters, merge_lora

TASKS = ("seg", "depth")
DIM, HIDDEN, DEPTH, RANK = 16, 32, 2, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.softmax(q @ k.transpose(-2, -1) / (c // self.heads) ** 0.5, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding (conv), position embedding, blocks, final norm; a [B, C, h, w] map out."""

    def __init__(self, dim: int = DIM, hidden: int = HIDDEN, depth: int = DEPTH, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 4, dim))
        self.blocks = nn.Sequential(*(Block(dim, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.patch_embed(x)
        b, c, h, w = y.shape
        y = self.norm(self.blocks(y.flatten(2).transpose(1, 2) + self.pos_embed))
        return y.transpose(1, 2).reshape(b, c, h, w)


def tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyViT:
    torch.manual_seed(seed)
    model = TinyViT().to(dtype)
    with torch.no_grad():  # non-trivial norms, so that "kept" and "converted" mean something
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 0.9)
                m.bias.uniform_(-0.1, 0.1)
    return model


def heads() -> dict[str, nn.Module]:
    return {"seg": nn.Conv2d(DIM, 3, 1), "depth": nn.Conv2d(DIM, 1, 1)}


def randomize_b(model: nn.Module) -> None:
    """Non-zero up-projections (as after training), so that merging has something to fold."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(m.lora_B.numel()))


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
# per linear: rank * (in + out); qkv 16->48, proj 16->16, fc1 16->32, fc2 32->16
LORA_PER_BLOCK = RANK * ((DIM + 3 * DIM) + (DIM + DIM) + (DIM + HIDDEN) + (HIDDEN + DIM))
LN_COUNT = 2 * DEPTH + 1


def test_lora_linear_fresh_adapter_is_exact_and_base_frozen():
    base = nn.Linear(16, 8)
    ref = copy.deepcopy(base)
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(5, 3, 16)
    assert torch.equal(lora(x), ref(x))
    assert not lora.base.weight.requires_grad and not lora.base.bias.requires_grad
    assert lora.lora_A.requires_grad and lora.lora_B.requires_grad
    assert lora.lora_A.shape == (4, 16) and lora.lora_B.shape == (8, 4) and torch.all(lora.lora_B == 0)
    assert lora.lora_A.abs().sum() > 0 and lora.scaling == 2.0
    assert (lora.in_features, lora.out_features) == (16, 8)
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = ref(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)
    torch.testing.assert_close(lora(x), expected)


def test_add_lora_exact_at_init_and_reports_what_it_wrapped():
    model = tiny()
    ref = copy.deepcopy(model)
    out = add_lora(model, RANK)
    assert out is model
    assert torch.equal(model(X), ref(X))
    report = model.mtnorm_lora_report
    assert len(report.wrapped) == 4 * DEPTH
    first = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert report.wrapped[:4] == first
    assert report.lora_parameters == DEPTH * LORA_PER_BLOCK
    assert "8 linears" in str(report) and "2 x qkv" in str(report)
    assert sum(p.numel() for p in lora_parameters(model)) == DEPTH * LORA_PER_BLOCK


def test_freeze_rest_leaves_lora_and_norms_trainable():
    model = add_lora(tiny(), RANK)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    norms = {n for n, _ in model.named_parameters() if "norm" in n}
    assert len(lora) == 2 * 4 * DEPTH and len(norms) == 2 * LN_COUNT
    assert trainable == lora | norms
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert {"patch_embed.weight", "pos_embed", "blocks.0.attn.qkv.base.weight"} <= frozen
    kept = add_lora(tiny(), RANK, freeze_rest=False)
    assert kept.pos_embed.requires_grad and kept.patch_embed.weight.requires_grad
    assert not kept.blocks[0].attn.qkv.base.weight.requires_grad  # the wrapped base is always frozen


def test_targets_as_suffixes_or_predicate():
    model = add_lora(tiny(), 2, targets=("qkv",))
    assert model.mtnorm_lora_report.wrapped == [f"blocks.{i}.attn.qkv" for i in range(DEPTH)]
    model = add_lora(tiny(), 2, targets=lambda name, lin: lin.out_features == HIDDEN)
    assert model.mtnorm_lora_report.wrapped == [f"blocks.{i}.mlp.fc1" for i in range(DEPTH)]
    # at dot boundaries: "proj" is not "out_proj"
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out_proj, self.proj = nn.Linear(4, 4), nn.Linear(4, 4)

    assert add_lora(M(), 2, targets="proj").mtnorm_lora_report.wrapped == ["proj"]


def test_clear_errors():
    for rank in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank must be an integer >= 1"):
            add_lora(tiny(), rank)
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRALinear(nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match=r"no nn.Linear matches targets \('query',\).*blocks.0.attn.qkv"):
        add_lora(tiny(), 4, targets=("query",))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(add_lora(tiny(), 4), 4)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        add_lora(nn.Sequential(nn.MultiheadAttention(8, 2)), 2, targets="out_proj")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny())
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoRALinear(nn.Conv2d(2, 2, 1), 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_merge_is_exact_and_restores_plain_linears(dtype, tol):
    model = add_lora(tiny(dtype=dtype), RANK, alpha=2 * RANK).eval()
    randomize_b(model)
    x = X.to(dtype)
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        after = merged(x)
    assert merged is model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)
    assert before.abs().max() > 0.1
    torch.testing.assert_close(after, before, atol=tol, rtol=tol)


def test_tssbn_with_lora_trains_only_adapters_gates_and_heads():
    model = build_method("tssbn", lambda norm: add_lora(tiny(), RANK), TASKS, heads())
    sigma = [m for m in model.modules() if isinstance(m, mtnorm.TaskSigmoidLayerNorm)]
    assert len(sigma) == LN_COUNT and not any(isinstance(m, nn.LayerNorm) for m in model.modules())

    head_params = sum(p.numel() for p in model.heads.parameters())
    assert head_params == (DIM * 3 + 3) + (DIM * 1 + 1)
    gates = LN_COUNT * 2 * DIM * len(TASKS)  # gamma and beta per task
    lora = DEPTH * LORA_PER_BLOCK
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert mtnorm.models.count_parameters(model) == lora + gates + head_params

    shared = {id(p) for p in mtnorm.shared_parameters(model)}
    assert shared == {id(p) for p in lora_parameters(model)}  # the adapters are the shared part
    task = {id(p) for p in mtnorm.task_parameters(model)}
    assert {id(p) for m in sigma for p in m.parameters()} <= task
    assert task | shared == trainable
    groups = {g["name"]: g for g in mtnorm.param_groups(model, lr=1e-3)}
    assert groups["layernorm"]["lr"] == pytest.approx(1e-2)
    assert sum(p.numel() for p in groups["layernorm"]["params"]) == gates

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = mtnorm.forward_tasks(model, X)
    sum(o.square().mean() for o in out.values()).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    # at init B = 0, so A gets no gradient in the first step: B, the gates and the heads move
    assert changed, "nothing trained"
    allowed = ("lora_A", "lora_B", "gamma", "beta")
    assert all(n.endswith(allowed) or n.startswith("heads.") for n in changed), sorted(changed)
    assert any(n.endswith("lora_B") for n in changed) and any(n.endswith("gamma") for n in changed)
    assert any(n.startswith("heads.") for n in changed)


def test_lora_after_convert_keeps_task_norms_trainable():
    model = add_lora(mtnorm.convert(tiny(), TASKS, norm="sigma"), RANK)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B", "gamma", "beta"))
    }


def test_merge_then_extract_matches_the_task_output():
    model = build_method("tssbn", lambda norm: add_lora(tiny(), RANK), TASKS, heads()).eval()
    randomize_b(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, mtnorm.TaskSigmoidLayerNorm):
                m.gamma.normal_(0, 1, generator=torch.Generator().manual_seed(2))
        with mtnorm.use_task(model, "depth"):
            ref = model(X)["depth"]
        single = mtnorm.extract(merge_lora(model), "depth")
        assert not any(isinstance(m, (LoRALinear, mtnorm.TaskRouted)) for m in single.modules())
        torch.testing.assert_close(single(X), ref, atol=1e-6, rtol=1e-6)


def test_timm_backbone_without_timm_says_how_to_install(monkeypatch):
    from mtnorm.models.vit import timm_backbone

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError, timm or not
    with pytest.raises(ImportError, match="pip install timm"):
        timm_backbone("vit_small_patch16_224")
