"""Benchmarks by name: data splits, task specs and the backbone/head builders for each.

A :class:`Benchmark` bundles everything dataset-specific, so the trainer never mentions a dataset:
``load(cfg)`` gives the train and test splits, ``specs`` the tasks and how they are scored
(:mod:`mtnorm.data.spec`), ``backbone(norm)`` and ``heads()`` fresh modules for
:func:`mtnorm.models.build_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtnorm.data.spec import TaskSpec
from mtnorm.data.spec import classification as classification_spec
from mtnorm.models.deeplab import ASPPHead, BinaryHead, CelebACNN
from mtnorm.models.lenet import LeNetEncoder, linear_heads
from mtnorm.models.resnet import ResNet18, ResNet50
from mtnorm.models.segnet import DenseHead, PooledHead, SegNet
from mtnorm.models.segnet_mtan import MTAN_FILTERS, MTANSegNet
from mtnorm.models.toy import ToyEncoder, make_toy
from mtnorm.train.config import Config, ConfigError


class DataUnavailableError(RuntimeError):
    """The benchmark's data cannot be loaded; the message says what is missing and where."""


@dataclass
class Split:
    """A dataset split. ``inputs``/``targets`` are whole-split tensors when the dataset exposes
    them (fast path: batches are tensor slices); otherwise items come from ``dataset[i]``."""

    dataset: Any
    inputs: torch.Tensor | None = None
    targets: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.inputs) if self.inputs is not None else len(self.dataset)


def as_split(dataset: Any, tasks: tuple[str, ...]) -> Split:
    """Wrap a dataset, picking up ``images``/``targets`` tensors when it has them."""
    images = getattr(dataset, "images", None)
    targets = getattr(dataset, "targets", None)
    if isinstance(images, torch.Tensor) and isinstance(targets, dict):
        return Split(dataset, images, {t: targets[t] for t in tasks})
    return Split(dataset)


@dataclass
class Benchmark:
    """What the trainer needs to know about one benchmark."""

    name: str
    tasks: tuple[str, ...]
    specs: dict[str, TaskSpec]
    load: Callable[[Config], tuple[Split, Split]]
    backbone: Callable[[str], nn.Module]
    heads: Callable[[], dict[str, nn.Module]]
    input_shape: tuple[int, ...] | None = None  # one input's shape, where fixed (for profiles)


def _select(
    specs: dict[str, TaskSpec], wanted: list[str] | None, default: tuple[str, ...]
) -> tuple[str, ...]:
    tasks = tuple(wanted or default)
    unknown = [t for t in tasks if t not in specs]
    if unknown:
        raise ConfigError(f"data.tasks: unknown tasks {unknown}; this benchmark has {list(specs)}")
    return tasks


def _sizes(cfg: Config) -> dict[str, Any]:
    kw: dict[str, Any] = {"seed": cfg.data.seed, "root": cfg.data.root}
    if cfg.data.n_train is not None:
        kw["n_train"] = cfg.data.n_train
    if cfg.data.n_test is not None:
        kw["n_test"] = cfg.data.n_test
    return kw


def _open(name: str, make: Callable[[], Any]) -> Any:
    """Build a dataset, turning a missing-file error into :class:`DataUnavailableError`."""
    try:
        return make()
    except FileNotFoundError as e:
        hint = ""
        if name in ("multifashion", "scenes"):
            hint = (
                " (install Debian's dataset-fashion-mnist with `make data`, or set "
                "MTNORM_FASHION_DIR to a folder with the four Fashion-MNIST idx files)"
            )
        # the first line says what is missing; the rest (an expected folder tree) keeps its lines
        first, _, tree = str(e).partition("\n")
        raise DataUnavailableError(f"{name}: {first}{hint}" + (f"\n{tree}" if tree else "")) from None


def _dense_heads(specs: dict[str, TaskSpec], tasks: tuple[str, ...], make: Callable) -> dict[str, nn.Module]:
    return {t: make(specs[t].num_outputs, specs[t].kind == "normal") for t in tasks}


def _multifashion(cfg: Config) -> Benchmark:
    from mtnorm.data import MultiFashion

    specs = MultiFashion.task_specs()
    tasks = _select(specs, cfg.data.tasks, MultiFashion.tasks)
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        kw = _sizes(cfg)
        splits = _open("multifashion", lambda: (MultiFashion("train", **kw), MultiFashion("test", **kw)))
        return as_split(splits[0], tasks), as_split(splits[1], tasks)

    return Benchmark(
        "multifashion",
        tasks,
        {t: specs[t] for t in tasks},
        load,
        lambda norm: LeNetEncoder(1, m.width, m.hidden, 36, norm),
        lambda: {
            t: BinaryHead(m.hidden) if specs[t].kind == "binary" else nn.Linear(m.hidden, 10)
            for t in tasks
        },
        (1, 36, 36),
    )


def _scenes(cfg: Config) -> Benchmark:
    from mtnorm.data import FashionScenes

    specs = FashionScenes.task_specs()
    tasks = _select(specs, cfg.data.tasks, FashionScenes.dense_tasks)
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        kw = _sizes(cfg)
        splits = _open("scenes", lambda: (FashionScenes("train", **kw), FashionScenes("test", **kw)))
        return as_split(splits[0], tasks), as_split(splits[1], tasks)

    def heads() -> dict[str, nn.Module]:
        return {
            t: PooledHead(m.width)
            if specs[t].kind == "binary"
            else DenseHead(m.width, specs[t].num_outputs, specs[t].kind == "normal")
            for t in tasks
        }

    return Benchmark(
        "scenes",
        tasks,
        {t: specs[t] for t in tasks},
        load,
        lambda norm: SegNet(1, m.width, m.levels, norm),
        heads,
        (1, 64, 64),
    )


def _toy(cfg: Config) -> Benchmark:
    """A tiny synthetic benchmark (a second to train) for smoke tests and examples."""
    tasks = tuple(cfg.data.tasks or ("a", "b"))
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        train = make_toy(cfg.data.n_train or 256, tasks, seed=cfg.data.seed, split=0)
        test = make_toy(cfg.data.n_test or 128, tasks, seed=cfg.data.seed, split=1)
        return Split(None, *train), Split(None, *test)

    return Benchmark(
        "toy",
        tasks,
        {t: classification_spec(3) for t in tasks},
        load,
        lambda norm: ToyEncoder(8, m.hidden, norm),
        lambda: linear_heads(tasks, m.hidden, 3),
        (8,),
    )


def _unknown_size() -> tuple[int, int]:
    raise RuntimeError("this backbone is built for its images' size: give the benchmark's input_size")


def _dense_backbone(
    cfg: Config, input_size: Callable[[], tuple[int, int]] = _unknown_size
) -> tuple[Callable[[str], nn.Module], Callable[[int, bool], nn.Module]]:
    """The backbone and head of a dense benchmark, by ``model.backbone``:

    * ``segnet`` (``default``): the configurable :class:`SegNet` (``width``, ``levels``, ``max_width``);
    * ``segnet_mtan``: MTAN's SegNet exactly (:class:`MTANSegNet`, 64..512, from scratch), DenseHead on 64;
    * ``resnet50`` / ``resnet18``: DeepLabV3, the dilated ResNet (output stride 8) and an ASPP head on
      2048 / 512 channels (LibMTL protocol; ``model.checkpoint`` for pretrained weights);
    * ``vit_s`` / ``swin_t`` (timm, an optional extra): ViT-S/16 or Swin-T as a feature map of 384 /
      768 channels at stride 16 / 32 (:func:`mtnorm.models.vit.timm_backbone`, built for the inputs'
      size), with an ASPP head that upsamples back (not the MLoRE / MTLoRA decoders of the paper's
      Tables 3-4). ``model.checkpoint`` takes timm's weights saved as a local state dict (position
      embeddings resampled to the input size); ``model.lora_rank: 16`` adds shared LoRA adapters and
      freezes the rest but the norms (the paper's "TSσBN (r=16)").
    """
    m = cfg.model
    if m.backbone in TIMM_BACKBONES:
        return _timm_dense(cfg, input_size)
    if m.backbone in ("segnet", "default"):
        return (
            lambda norm: SegNet(3, m.width, m.levels, norm, max_width=m.max_width),
            lambda out, unit: DenseHead(m.width, out, unit),
        )
    if m.backbone == "segnet_mtan":
        return lambda norm: MTANSegNet(3, norm), lambda out, unit: DenseHead(MTAN_FILTERS[0], out, unit)
    if m.backbone == "resnet50":
        return lambda norm: ResNet50(3, norm), lambda out, unit: ASPPHead(2048, out, normalize=unit)
    if m.backbone == "resnet18":
        return lambda norm: ResNet18(3, norm), lambda out, unit: ASPPHead(512, out, normalize=unit)
    raise ConfigError(
        f"model.backbone: {m.backbone!r} is not available for dense tasks; "
        f"use segnet, segnet_mtan, resnet50, resnet18 or {' or '.join(TIMM_BACKBONES)}"
    )


# model.backbone -> (timm model name, feature channels, output stride)
TIMM_BACKBONES = {
    "vit_s": ("vit_small_patch16_224", 384, 16),
    "swin_t": ("swin_tiny_patch4_window7_224", 768, 32),
}


def _timm_dense(
    cfg: Config, input_size: Callable[[], tuple[int, int]]
) -> tuple[Callable[[str], nn.Module], Callable[[int, bool], nn.Module]]:
    """A timm transformer backbone for a dense benchmark. Its input size is fixed when it is built
    (ViT's position embeddings, Swin's windows), so it is read from the data: ``input_size()`` gives
    the images' ``(H, W)`` once the benchmark's ``load`` ran (the trainer loads data first)."""
    from mtnorm.models.vit import timm_backbone

    name, channels, stride = TIMM_BACKBONES[cfg.model.backbone]

    def backbone(norm: str) -> nn.Module:
        del norm  # the methods convert the transformer's LayerNorms themselves
        h, w = input_size()
        if h % stride or w % stride:
            raise ConfigError(
                f"model.backbone: {cfg.model.backbone} needs images whose sides are multiples of "
                f"{stride}; this benchmark's are {h}x{w}"
            )
        return timm_backbone(name, img_size=(h, w))

    return backbone, lambda out, unit: ASPPHead(channels, out, upsample=stride, normalize=unit)


def _dense(name: str) -> Callable[[Config], Benchmark]:
    def make(cfg: Config) -> Benchmark:
        import mtnorm.data as data

        cls = {"nyuv2": data.NYUv2, "cityscapes": data.Cityscapes}[name]
        specs = cls.task_specs()
        tasks = _select(specs, cfg.data.tasks, tuple(specs))
        size: list[int] = []  # the images' (H, W), known once the data is loaded

        def input_size() -> tuple[int, int]:
            if not size:
                raise RuntimeError(f"the {name} backbone is built from its images' size: load the data first")
            return size[0], size[1]

        backbone, head = _dense_backbone(cfg, input_size)

        def load(cfg: Config) -> tuple[Split, Split]:
            root = _require_root(name, cfg)
            train, test = _open(name, lambda: (cls(root, "train"), cls(root, "test")))
            size[:] = train[0][0].shape[-2:]
            return as_split(train, tasks), as_split(test, tasks)

        return Benchmark(
            name,
            tasks,
            {t: specs[t] for t in tasks},
            load,
            backbone,
            lambda: _dense_heads(specs, tasks, head),
        )

    return make


def _celeba(cfg: Config) -> Benchmark:
    from mtnorm.data import CelebA

    backbone, make_heads = _celeba_backbone(cfg)  # a wrong backbone is refused before data is read
    root = _require_root("celeba", cfg)
    train = _open("celeba", lambda: CelebA(root, "train"))
    specs = train.task_specs()
    tasks = _select(specs, cfg.data.tasks, tuple(specs))

    def load(cfg: Config) -> tuple[Split, Split]:
        return as_split(train, tasks), as_split(_open("celeba", lambda: CelebA(root, "test")), tasks)

    return Benchmark(
        "celeba",
        tasks,
        {t: specs[t] for t in tasks},
        load,
        backbone,
        lambda: make_heads(tasks),
    )


def _celeba_backbone(
    cfg: Config,
) -> tuple[Callable[[str], nn.Module], Callable[[tuple[str, ...]], dict[str, nn.Module]]]:
    """CelebA's backbone by ``model.backbone``: ``default`` is :class:`CelebACNN` (channels ``width`` x
    1, 2, 4, 8), ``resnet18`` the undilated ResNet-18 with a pooled linear head per attribute (the
    CelebA setup of Sener & Koltun 2018)."""
    m = cfg.model
    if m.backbone == "default":
        return (
            lambda norm: CelebACNN(3, (m.width, 2 * m.width, 4 * m.width, 8 * m.width), norm),
            lambda tasks: {t: BinaryHead(8 * m.width) for t in tasks},
        )
    if m.backbone == "resnet18":
        return (
            lambda norm: ResNet18(3, norm, dilated=False),
            lambda tasks: {t: PooledHead(512) for t in tasks},
        )
    raise ConfigError(
        f"model.backbone: {m.backbone!r} is not available for celeba; "
        "use default (the CelebA CNN) or resnet18"
    )


def _require_root(name: str, cfg: Config) -> str:
    if not cfg.data.root:
        raise DataUnavailableError(f"{name}: set data.root to the dataset folder (it is not bundled)")
    return cfg.data.root


BENCHMARKS: dict[str, Callable[[Config], Benchmark]] = {
    "multifashion": _multifashion,
    "scenes": _scenes,
    "toy": _toy,
    "nyuv2": _dense("nyuv2"),
    "cityscapes": _dense("cityscapes"),
    "celeba": _celeba,
}


def get_benchmark(cfg: Config) -> Benchmark:
    """The benchmark named by ``cfg.data.name`` (a :class:`ConfigError` lists the valid names)."""
    if cfg.data.name not in BENCHMARKS:
        raise ConfigError(
            f"data.name: unknown benchmark {cfg.data.name!r}; choose one of {sorted(BENCHMARKS)}"
        )
    return BENCHMARKS[cfg.data.name](cfg)
