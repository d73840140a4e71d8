"""The paper-protocol backbones, layer for layer and parameter for parameter, and every config under
configs/ loads (and, where its data is bundled, builds and runs its model)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtnorm import tasks_of
from mtnorm.arch.stages import run_stages, stages_of
from mtnorm.models import MTANSegNet, ResNet18, ResNet50, build_method, count_parameters
from mtnorm.models.deeplab import ASPPHead, CelebACNN
from mtnorm.models.segnet import DenseHead
from mtnorm.train import load_config
from mtnorm.train.benchmarks import _celeba_backbone, _dense_backbone, get_benchmark
from mtnorm.train.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_bn(cin: int, cout: int, bias: bool) -> int:
    """A 3x3 convolution (+ bias) and a BatchNorm (weight and bias)."""
    return 9 * cin * cout + (cout if bias else 0) + 2 * cout


# ---------------------------------------------------------------- MTAN's SegNet
# (cin, cout) of the 13 encoder and 13 decoder layers of MTAN's SegNet (model_segnet_*.py):
# encoder_block[k] + conv_block_enc[k], then decoder_block[k] + conv_block_dec[k] from k = 4 down to 0.
MTAN_ENCODER = [
    [(3, 64), (64, 64)],
    [(64, 128), (128, 128)],
    [(128, 256), (256, 256), (256, 256)],
    [(256, 512), (512, 512), (512, 512)],
    [(512, 512), (512, 512), (512, 512)],
]
MTAN_DECODER = [
    [(512, 512), (512, 512), (512, 512)],
    [(512, 256), (256, 256), (256, 256)],
    [(256, 128), (128, 128), (128, 128)],
    [(128, 64), (64, 64)],
    [(64, 64), (64, 64)],
]


@pytest.fixture(scope="module")
def segnet() -> MTANSegNet:
    torch.manual_seed(0)
    return MTANSegNet(3).eval()


def test_mtan_segnet_has_13_plus_13_conv_norm_relu_layers(segnet):
    convs = [m for m in segnet.modules() if isinstance(m, nn.Conv2d)]
    assert len([m for m in segnet.encoder.modules() if isinstance(m, nn.Conv2d)]) == 13
    assert len([m for m in segnet.decoder.modules() if isinstance(m, nn.Conv2d)]) == 13
    assert len([m for m in segnet.modules() if isinstance(m, nn.BatchNorm2d)]) == 26
    assert len([m for m in segnet.modules() if isinstance(m, nn.ReLU)]) == 26
    assert [len(b) for b in segnet.encoder] == [2, 2, 3, 3, 3]
    assert [len(b) for b in segnet.decoder] == [3, 3, 3, 2, 2]
    layers = MTAN_ENCODER + MTAN_DECODER
    assert [(c.in_channels, c.out_channels) for c in convs] == [p for block in layers for p in block]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert segnet.out_channels == 64
    assert all(not c.bias.any() for c in convs)  # MTAN's init: zero bias (Xavier-normal weights)


def test_mtan_segnet_parameter_count_by_hand(segnet):
    layers = [p for block in MTAN_ENCODER + MTAN_DECODER for p in block]
    # sum over the 26 layers of 9*cin*cout + cout (conv bias, kept as in MTAN) + 2*cout (BN):
    # 24,943,296 with the bias, 24,936,128 without (the 7,168 biases are 0.03%)
    assert sum(conv_bn(a, b, True) for a, b in layers) == 24_943_296
    assert sum(conv_bn(a, b, False) for a, b in layers) == 24_936_128
    assert n_params(segnet) == 24_943_296
    assert n_params(MTANSegNet(3, bias=False)) == 24_936_128


def test_mtan_segnet_output_and_stages_are_its_forward(segnet):
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        y = segnet(x)
        assert y.shape == (1, 64, 32, 32)
        stages = stages_of(segnet)
        assert len(stages) == 10
        assert torch.equal(run_stages(stages, x), y)
        # an independent forward written the way MTAN writes it
        h, indices, sizes = x, [], []
        for block in segnet.encoder:
            h = block(h)
            sizes.append(h.shape[-2:])
            h, idx = F.max_pool2d(h, 2, return_indices=True)
            indices.append(idx)
        for block in segnet.decoder:
            h = block(F.max_unpool2d(h, indices.pop(), 2, output_size=sizes.pop()))
        assert torch.equal(h, y)


def test_mtan_segnet_norms_come_from_norm_layer():
    net = MTANSegNet(3, "gn", filters=(8, 8, 16, 16, 16))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert len([m for m in net.modules() if isinstance(m, nn.GroupNorm)]) == 26
    plain = MTANSegNet(3, "none", filters=(8, 8, 16, 16, 16), bias=False)
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d))  # no norm: bias
    with pytest.raises(ValueError, match="5 levels"):
        MTANSegNet(3, filters=(8, 16))


# ---------------------------------------------------------------- ResNet-18
def test_resnet18_has_torchvisions_parameter_count_without_fc():
    # torchvision resnet18: 11,689,512 parameters, fc = Linear(512, 1000) = 512*1000 + 1000 = 513,000
    assert 11_689_512 - (512 * 1000 + 1000) == 11_176_512
    assert n_params(ResNet18(3)) == 11_176_512
    assert n_params(ResNet18(3, dilated=False)) == 11_176_512


def test_resnet18_state_dict_has_torchvisions_layout():
    state = ResNet18(3).state_dict()
    # torchvision's resnet18 state dict has 122 entries; 120 without fc.weight and fc.bias
    assert len(state) == 120
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert state["layer1.1.conv2.weight"].shape == (64, 64, 3, 3)
    assert state["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert state["layer3.0.downsample.1.running_var"].shape == (256,)
    assert state["layer4.1.bn2.num_batches_tracked"].shape == ()
    assert not any(k.startswith("layer1.0.downsample") for k in state)
    ResNet18(3, dilated=False).load_state_dict(state)  # same keys whatever the dilation


def test_resnet18_dilated_gives_output_stride_8_and_its_stages_are_its_forward():
    torch.manual_seed(0)
    net = ResNet18(3).eval()
    x = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (1, 512, 4, 6)
        assert torch.equal(run_stages(stages_of(net), x), y)
        assert ResNet18(3, dilated=False).eval()(x).shape == (1, 512, 1, 2)
        assert ASPPHead(512, 7, mid=8).eval()(y).shape == (1, 7, 32, 48)
    assert net.out_channels == 512 and net.output_stride == 8


def test_dilation_follows_libmtls_resnet_dilated():
    """The 3x3 conv that lost its stride gets half the layer's dilation, every other 3x3 the full one."""

    def dilations(net):
        return {n: m.dilation[0] for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}

    d18 = dilations(ResNet18(3))
    assert (d18["layer3.0.conv1"], d18["layer3.0.conv2"], d18["layer3.1.conv1"]) == (1, 2, 2)
    assert (d18["layer4.0.conv1"], d18["layer4.0.conv2"], d18["layer4.1.conv2"]) == (2, 4, 4)
    assert d18["layer2.0.conv1"] == 1
    d50 = dilations(ResNet50(3, blocks=(1, 1, 2, 2)))
    assert (d50["layer3.0.conv2"], d50["layer3.1.conv2"]) == (1, 2)
    assert (d50["layer4.0.conv2"], d50["layer4.1.conv2"]) == (2, 4)
    deep = [m for n, m in ResNet18(3).named_modules() if n.startswith(("layer3", "layer4"))]
    assert all(m.stride == (1, 1) for m in deep if isinstance(m, nn.Conv2d))


# ---------------------------------------------------------------- CelebA CNN
def test_celeba_cnn_parameter_count_at_the_configs_width():
    # configs/celeba_cnn.yaml: width 64 -> channels 64, 128, 256, 512, one bias-free conv + BN each
    chans = [3, 64, 128, 256, 512]
    by_hand = sum(9 * a * b + 2 * b for a, b in zip(chans, chans[1:]))
    assert by_hand == 1_551_936
    assert n_params(CelebACNN(3, (64, 128, 256, 512))) == 1_551_936


def test_famo_reference_celeba_network_is_larger():
    """FAMO's experiments/celeba/models.py ``shared_base``, written out: the protocol's reference (the
    docstring of CelebACNN says how ours differs)."""
    layers: list[nn.Module] = []
    plan = [(3, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), "M", (256, 512), (512, 512)]
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            a, b = item
            layers += [nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for _ in range(2):
        layers += [nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU()]
    famo = nn.Sequential(*layers)
    convs = [(3, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    by_hand = sum(9 * a * b + 2 * b for a, b in convs) + 2 * (512 * 512 + 2 * 512)
    assert by_hand == 5_176_640 == n_params(famo)
    assert famo.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 512)


# ---------------------------------------------------------------- benchmark wiring
def _cfg(name: str, backbone: str):
    overrides = {"data.name": name, "model.backbone": backbone}
    return load_config(ROOT / "configs" / "nyuv2_segnet.yaml", overrides)


def test_dense_backbones_by_name(segnet):
    make, head = _dense_backbone(_cfg("nyuv2", "segnet_mtan"))
    assert isinstance(make("bn"), MTANSegNet)
    dense = head(13, False)
    assert isinstance(dense, DenseHead) and dense.body[0].in_channels == 64
    make, head = _dense_backbone(_cfg("cityscapes", "resnet18"))
    net = make("bn")
    assert isinstance(net, ResNet18) and net.output_stride == 8
    aspp = head(7, False)
    assert isinstance(aspp, ASPPHead) and aspp.branches[0][0].in_channels == 512
    # the transformers (built by timm, in the integration venv) get an ASPP head upsampling back
    for backbone, channels, stride in (("vit_s", 384, 16), ("swin_t", 768, 32)):
        _, head = _dense_backbone(_cfg("nyuv2", backbone), lambda: (64, 96))
        aspp = head(13, False)
        assert aspp.branches[0][0].in_channels == channels and aspp.upsample == stride
    with pytest.raises(ConfigError, match="not one of"):
        _cfg("nyuv2", "vgg16")


def test_celeba_backbone_choice():
    make, heads = _celeba_backbone(load_config(ROOT / "configs" / "celeba_cnn.yaml"))
    assert isinstance(make("bn"), CelebACNN)
    assert set(heads(("Smiling", "Bangs"))) == {"Smiling", "Bangs"}
    cfg = load_config(ROOT / "configs" / "celeba_cnn.yaml", {"model.backbone": "resnet18"})
    make, heads = _celeba_backbone(cfg)
    assert make("bn").output_stride == 32
    assert heads(("Smiling",))["Smiling"](torch.rand(3, 512, 2, 2)).shape == (3,)
    cfg = load_config(ROOT / "configs" / "celeba_cnn.yaml", {"model.backbone": "segnet_mtan"})
    with pytest.raises(ConfigError, match="not available for celeba"):
        get_benchmark(cfg)  # refused before the (missing) data is looked for


# ---------------------------------------------------------------- every config
BUNDLED = ("multifashion", "scenes", "toy")
TINY = {"data.n_train": 8, "data.n_test": 4, "data.batch_size": 4, "device": "cpu"}
_SPLITS: dict[str, object] = {}


def _fashion_available() -> bool:
    from mtnorm.data import find_fashion_dir

    try:
        find_fashion_dir()
    except FileNotFoundError:
        return False
    return True


def test_there_is_a_config_for_every_architecture_on_both_fashion_benchmarks():
    names = {p.stem for p in (ROOT / "configs" / "arch").glob("*.yaml")}
    for method in ("cross_stitch", "mtan", "ltb", "mmoe", "cgc", "ple", "dselect_k"):
        assert {f"{method}_multifashion", f"{method}_scenes"} <= names
    sigma = {f"{m}_sigma_{b}" for m in ("mtan", "mmoe") for b in ("multifashion", "scenes")}
    assert sigma <= names
    for p in (ROOT / "configs" / "arch").glob("*.yaml"):
        cfg = load_config(p)
        assert p.stem.startswith(cfg.method)
        assert (cfg.method_kwargs.get("norm") == "sigma") == ("_sigma_" in p.stem)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_loads_and_builds(path, tmp_path):
    cfg = load_config(path, {**TINY, "out": str(tmp_path)})
    # the methods a protocol config says to switch to are valid there too
    load_config(path, {**TINY, "method": "mtan", "method_kwargs": {}})
    if cfg.data.name not in BUNDLED:
        # nyuv2 / cityscapes / celeba need data.root: the backbone choice is checked, nothing built
        if cfg.data.name == "celeba":
            _celeba_backbone(cfg)
        elif cfg.data.name in ("nyuv2", "cityscapes"):
            _dense_backbone(cfg)
        return
    if cfg.data.name != "toy" and not _fashion_available():
        if os.environ.get("CI") == "true":
            pytest.fail("Fashion-MNIST files are missing under CI=true (run `make data`)")
        pytest.skip("Fashion-MNIST files are not installed")
    bench = get_benchmark(cfg)
    if cfg.data.name not in _SPLITS:
        _SPLITS[cfg.data.name] = bench.load(cfg)[0]
    train = _SPLITS[cfg.data.name]
    x = train.inputs[:2]
    torch.manual_seed(0)
    # building runs the backbone's stages on x (stage-wise architectures size their modules from it);
    # a forward of every model would cost seconds, so none is run here
    model = build_method(
        cfg.method, bench.backbone, bench.tasks, bench.heads(), example_input=x, **cfg.method_kwargs
    )
    assert count_parameters(model) > 0
    assert tasks_of(model) == bench.tasks
