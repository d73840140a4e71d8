"""The GPU-protocol benchmarks wire up end to end on a tiny fake NYUv2 folder (MTAN .npy layout)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from train_helpers import toy_config

from mtnorm.models.deeplab import ASPPHead, CelebACNN
from mtnorm.models.resnet import ResNet50
from mtnorm.train import Trainer


def fake_nyuv2(root, n=8, h=16, w=16):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True)
        for i in range(n):
            np.save(root / split / "image" / f"{i}.npy", rng.random((h, w, 3), dtype=np.float32))
            np.save(root / split / "label" / f"{i}.npy", rng.integers(-1, 13, (h, w)).astype(np.float32))
            np.save(root / split / "depth" / f"{i}.npy", rng.random((h, w, 1), dtype=np.float32) + 0.5)
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            np.save(
                root / split / "normal" / f"{i}.npy", normal / np.linalg.norm(normal, axis=-1, keepdims=True)
            )


def test_nyuv2_segnet_trains_on_fake_files(tmp_path):
    fake_nyuv2(tmp_path / "nyu")
    cfg = toy_config(
        tmp_path / "run",
        method="tssbn",
        epochs=1,
        data={"name": "nyuv2", "root": str(tmp_path / "nyu"), "batch_size": 4, "eval_batch_size": 4},
        model={"backbone": "segnet", "width": 4, "levels": 2},
    )
    result = Trainer(cfg, log=None).fit()
    assert result.status == "finished"
    assert set(result.metrics) == {"segmentation", "depth", "normal"}
    assert {"miou", "abs_err", "mean"} <= {k for m in result.metrics.values() for k in m}


def test_resnet50_is_dilated_to_stride_8_and_aspp_upsamples_back():
    net = ResNet50(3).eval()
    assert sum(p.numel() for p in net.parameters()) == 23_508_032  # torchvision resnet50 minus fc
    with torch.no_grad():
        z = net(torch.rand(1, 3, 32, 32))
        assert z.shape == (1, 2048, 4, 4)
        y = ASPPHead(2048, 13, mid=8).eval()(z)
    assert y.shape == (1, 13, 32, 32)


def test_celeba_cnn_gives_a_vector():
    assert CelebACNN(3, (4, 8, 8, 16))(torch.rand(2, 3, 64, 64)).shape == (2, 16)


def _fake_nyuv2_trainer(tmp_path, backbone: str, h: int, w: int) -> Trainer:
    fake_nyuv2(tmp_path / "nyu", n=2, h=h, w=w)
    cfg = toy_config(
        tmp_path / "run",
        method="tssbn",
        data={"name": "nyuv2", "root": str(tmp_path / "nyu"), "batch_size": 2},
        model={"backbone": backbone},
    )
    return Trainer(cfg, log=None)


def test_a_transformer_backbone_needs_image_sides_divisible_by_its_stride(tmp_path):
    from mtnorm.train import ConfigError

    with pytest.raises(ConfigError, match=r"vit_s needs images whose sides are multiples of 16; .* 24x32"):
        _fake_nyuv2_trainer(tmp_path, "vit_s", 24, 32)


def test_a_transformer_backbone_without_timm_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ImportError, match="pip install timm"):
        _fake_nyuv2_trainer(tmp_path, "swin_t", 32, 32)


def test_an_unknown_backbone_lists_the_choices(tmp_path):
    from mtnorm.train import ConfigError

    with pytest.raises(ConfigError, match=r"model.backbone: 'vgg' is not one of .*'vit_s', 'swin_t'"):
        toy_config(tmp_path / "run", model={"backbone": "vgg"})
