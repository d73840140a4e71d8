"""ViT-S and Swin-T from timm with task σLN and shared LoRA (random init, tiny inputs, nothing
downloads): every LayerNorm converted, dense task outputs, the trainable parameters counted by
hand, a training step, and merge + extract back to a plain timm model."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import mtnorm
from mtnorm.models import DenseHead, build_method
from mtnorm.models.lora import LoRALinear, add_lora, lora_parameters, merge_lora
from mtnorm.models.vit import TimmBackbone, timm_backbone
from mtnorm.norm.registry import looks_like_norm

TASKS = ("seg", "normal")
OUTS = {"seg": 5, "normal": 3}
R = 16
IMG32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IMG64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

# ViT-S/16: depth 12, width 384; per block qkv 384->1152, proj 384->384, fc1 384->1536, fc2 1536->384
VIT_DEPTH, VIT_DIM = 12, 384
VIT_LORA = VIT_DEPTH * R * ((384 + 1152) + (384 + 384) + (384 + 1536) + (1536 + 384))
VIT_LN = 2 * VIT_DEPTH + 1  # norm1 and norm2 per block, the final norm
# Swin-T: widths 96/192/384/768, depths 2/2/6/2; per block rank * 16 * width (qkv d->3d, proj d->d,
# fc1 d->4d, fc2 4d->d); LayerNorms: patch embed, 2 per block, 3 patch mergings, the final norm
SWIN_WIDTHS, SWIN_DEPTHS = (96, 192, 384, 768), (2, 2, 6, 2)
SWIN_LORA = sum(R * 16 * d * n for d, n in zip(SWIN_WIDTHS, SWIN_DEPTHS))
SWIN_LN = 1 + 2 * sum(SWIN_DEPTHS) + 3 + 1


def vit_s(**kw) -> TimmBackbone:
    torch.manual_seed(0)
    return timm_backbone("vit_small_patch16_224", img_size=32, **kw)


def swin_t(**kw) -> TimmBackbone:
    torch.manual_seed(0)
    return timm_backbone("swin_tiny_patch4_window7_224", img_size=64, **kw)


pytestmark = pytest.mark.usefixtures("one_thread")


# timm's own init of the full models takes seconds on a shared CPU: built once, copied per test
@pytest.fixture(scope="module")
def vit_once() -> TimmBackbone:
    return vit_s()


@pytest.fixture(scope="module")
def swin_once() -> TimmBackbone:
    return swin_t()


@pytest.fixture
def vit(vit_once) -> TimmBackbone:
    return copy.deepcopy(vit_once)


@pytest.fixture
def swin(swin_once) -> TimmBackbone:
    return copy.deepcopy(swin_once)


def dense_heads(width: int) -> dict[str, nn.Module]:
    torch.manual_seed(1)
    return {t: DenseHead(width, OUTS[t], normalize=t == "normal") for t in TASKS}


def head_params(width: int) -> int:
    """DenseHead: 3x3 conv width->width, then 1x1 conv width->out, both with bias."""
    return sum(width * width * 9 + width + width * out + out for out in OUTS.values())


def sigma_gates(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, mtnorm.TaskSigmoidLayerNorm)]


def test_vit_s_map_and_tokens(vit):
    backbone = vit
    assert isinstance(backbone.model, VisionTransformer)
    assert (backbone.out_channels, backbone.reduction, backbone.num_prefix_tokens) == (384, 16, 1)
    with torch.no_grad():
        fmap = backbone(IMG32)
        tokens = copy.deepcopy(backbone).train(False)
        tokens.features = "tokens"
        seq = tokens(IMG32)
    assert fmap.shape == (2, 384, 2, 2) and seq.shape == (2, 1 + 4, 384)
    # the map is the patch tokens in row-major order
    torch.testing.assert_close(fmap.flatten(2).transpose(1, 2), seq[:, 1:])


def test_vit_s_tssbn_converts_every_layernorm_and_gives_dense_outputs(vit):
    backbone = vit
    assert sum(1 for m in backbone.modules() if looks_like_norm(m)) == VIT_LN
    model = build_method("tssbn", lambda norm: backbone, TASKS, dense_heads(VIT_DIM))
    report = model.encoder.mtnorm_report
    assert not report.shared, str(report)
    assert sum(report.converted.values()) == VIT_LN == len(sigma_gates(model)), str(report)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    out = mtnorm.forward_tasks(model, IMG32)
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, OUTS[t], 2, 2) for t in TASKS}


def test_vit_s_lora_trainable_parameters_and_a_training_step(vit):
    model = build_method("tssbn", lambda norm: add_lora(vit, R), TASKS, dense_heads(VIT_DIM))
    assert len(model.encoder.mtnorm_lora_report.wrapped) == 4 * VIT_DEPTH
    gates = VIT_LN * 2 * VIT_DIM * len(TASKS)  # σLN: gamma and beta per task (timm's LN has a bias)
    assert VIT_LORA == 1_179_648
    assert sum(p.numel() for p in lora_parameters(model)) == VIT_LORA
    assert mtnorm.models.count_parameters(model) == VIT_LORA + gates + head_params(VIT_DIM)
    shared = mtnorm.shared_parameters(model)
    assert {id(p) for p in shared} == {id(p) for p in lora_parameters(model)}
    assert sum(p.numel() for m in sigma_gates(model) for p in m.parameters()) == gates
    assert {id(p) for m in sigma_gates(model) for p in m.parameters()} <= {
        id(p) for p in mtnorm.task_parameters(model)
    }

    targets = {t: torch.randn(2, OUTS[t], 2, 2, generator=torch.Generator().manual_seed(3)) for t in TASKS}

    def loss() -> torch.Tensor:
        out = mtnorm.forward_tasks(model, IMG32)
        return sum(nn.functional.mse_loss(out[t], targets[t]) for t in TASKS)

    model.train()
    opt = torch.optim.Adam(mtnorm.param_groups(model, lr=1e-3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = loss()
    first.backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        second = loss()
    assert second < first
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert all(n.endswith(("lora_A", "lora_B", "gamma", "beta")) or n.startswith("heads.") for n in changed)
    assert not any(".base." in n or "pos_embed" in n or "patch_embed" in n for n in changed)


def test_vit_s_merge_then_extract_is_a_plain_timm_model(vit):
    model = build_method("tssbn", lambda norm: add_lora(vit, R), TASKS, dense_heads(VIT_DIM)).eval()
    with torch.no_grad():  # as after training: non-zero adapters and differing task gates
        g = torch.Generator().manual_seed(4)
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.02, generator=g)
            if isinstance(m, mtnorm.TaskSigmoidLayerNorm):
                m.gamma.normal_(0, 1, generator=g)
        with mtnorm.use_task(model, "seg"):
            ref = model(IMG32)["seg"]
            ref_features = model.encoder(IMG32)
        single = mtnorm.extract(merge_lora(model), "seg")
        vit = single.encoder.model
        assert isinstance(vit, VisionTransformer)
        mtnorm_kinds = (LoRALinear, mtnorm.TaskRouted, mtnorm.TaskNorm, mtnorm.TaskNormWrapper)
        assert not any(isinstance(m, mtnorm_kinds) for m in single.modules())
        assert isinstance(vit.blocks[0].attn.qkv, nn.Linear)
        assert sum(1 for m in vit.modules() if type(m) is timm.layers.LayerNorm) == VIT_LN
        torch.testing.assert_close(single.encoder(IMG32), ref_features, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(single(IMG32), ref, atol=1e-5, rtol=1e-5)


def test_swin_t_tssbn_with_lora(swin):
    """Full Swin-T (depths 2/2/6/2, widths 96..768) at 64x64: 16x16 tokens in stage 1, 2x2 in stage 4."""
    plain = swin
    assert isinstance(plain.model, SwinTransformer)
    assert sum(1 for m in plain.modules() if looks_like_norm(m)) == SWIN_LN
    with torch.no_grad():
        assert plain(IMG64).shape == (2, 768, 2, 2)  # timm's NHWC permuted to NCHW
    model = build_method("tssbn", lambda norm: add_lora(plain, R), TASKS, dense_heads(768))
    report = model.encoder.mtnorm_report
    assert not report.shared and sum(report.converted.values()) == SWIN_LN == len(sigma_gates(model))
    assert len(model.encoder.mtnorm_lora_report.wrapped) == 4 * sum(SWIN_DEPTHS)  # not the mergings
    ln_channels = 96 + 2 * sum(d * n for d, n in zip(SWIN_WIDTHS, SWIN_DEPTHS)) + 4 * (96 + 192 + 384) + 768
    gates = ln_channels * 2 * len(TASKS)
    assert SWIN_LORA == 1_130_496
    assert mtnorm.models.count_parameters(model) == SWIN_LORA + gates + head_params(768)
    with torch.no_grad():
        out = mtnorm.forward_tasks(model, IMG64, mode="batched")
    assert {t: tuple(o.shape) for t, o in out.items()} == {t: (2, OUTS[t], 2, 2) for t in TASKS}


def test_pretrained_path_loads_local_weights_only(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model(
        "vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32, depth=2
    )
    path = tmp_path / "vit_s.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = vit_s(depth=2, pretrained_path=path)  # the classifier is dropped, the rest must fit
    own = loaded.model.state_dict()
    assert "head.weight" not in own
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(own[key], value), key
    # a 224x224 checkpoint into the 32x32 model: timm's own filter resamples the position embedding
    big = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, depth=2)
    torch.save(big.state_dict(), tmp_path / "vit_s_224.pth")
    resized = vit_s(depth=2, pretrained_path=tmp_path / "vit_s_224.pth").model
    assert big.pos_embed.shape == (1, 1 + 14 * 14, 384) and resized.pos_embed.shape == (1, 1 + 2 * 2, 384)
    assert torch.equal(resized.blocks[1].mlp.fc2.weight, big.blocks[1].mlp.fc2.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        vit_s(depth=2, pretrained_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="missing keys"):
        vit_s(depth=3, pretrained_path=path)
    with pytest.raises(ValueError, match="fixes 'pretrained'"):
        vit_s(pretrained=True)
