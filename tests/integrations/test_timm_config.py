"""``model.backbone: vit_s | swin_t`` in a YAML config: the trainer builds timm's model for the
data's image size, loads ``model.checkpoint`` (timm's weights, resampled) and adds shared LoRA of
``model.lora_rank``, on a tiny fake NYUv2 folder (random weights, nothing downloads)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
from test_train_dense_benchmarks import fake_nyuv2  # noqa: E402
from train_helpers import toy_config  # noqa: E402

from mtnorm.models.lora import lora_parameters  # noqa: E402
from mtnorm.norm import TaskSigmoidLayerNorm  # noqa: E402
from mtnorm.train import Trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, **model):
    return toy_config(
        tmp_path / "run",
        method="tssbn",
        epochs=1,
        data={"name": "nyuv2", "root": str(tmp_path / "nyu"), "batch_size": 2, "eval_batch_size": 2},
        model=model,
    )


def test_vit_s_from_a_local_checkpoint_trains_with_task_sigma_layernorms(tmp_path):
    fake_nyuv2(tmp_path / "nyu", n=4, h=32, w=48)
    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)  # 224x224
    torch.save(source.state_dict(), tmp_path / "vit_s.pth")
    trainer = Trainer(_config(tmp_path, backbone="vit_s", checkpoint=str(tmp_path / "vit_s.pth")), log=None)
    vit = trainer.model.encoder.model
    assert vit.pos_embed.shape == (1, 1 + 2 * 3, 384)  # resampled from 14x14 to the 32x48 grid
    assert torch.equal(vit.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    norms = [m for m in vit.modules() if isinstance(m, TaskSigmoidLayerNorm)]
    assert len(norms) == 2 * 12 + 1  # every LayerNorm of the 12 blocks, and the final one
    result = trainer.fit()
    assert result.status == "finished" and set(result.metrics) == {"segmentation", "depth", "normal"}


def test_swin_t_with_lora_trains_only_adapters_norms_and_heads(tmp_path):
    fake_nyuv2(tmp_path / "nyu", n=4, h=64, w=64)
    trainer = Trainer(_config(tmp_path, backbone="swin_t", lora_rank=4), log=None)
    model = trainer.model
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    adapters = {id(p) for p in lora_parameters(model)}
    norms = {id(p) for m in model.modules() if isinstance(m, TaskSigmoidLayerNorm) for p in m.parameters()}
    heads = {id(p) for p in model.heads.parameters()}
    assert adapters and norms and trainable == adapters | norms | heads
    # Swin-T: per block rank * 16 * width (qkv, proj, fc1, fc2), widths 96..768, depths 2, 2, 6, 2
    assert sum(p.numel() for p in lora_parameters(model)) == sum(
        4 * 16 * d * n for d, n in zip((96, 192, 384, 768), (2, 2, 6, 2))
    )
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainer.fit().status == "finished"
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen_before.items())
