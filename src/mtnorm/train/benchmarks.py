"""Benchmarks by name: data splits, task specs and the backbone/head builders for each.

A :class:`Benchmark` bundles everything dataset-specific, so the trainer itself never mentions a
dataset: ``load(cfg)`` gives the two splits, ``tasks``/``specs`` the tasks and how to score them,
``backbone(norm)`` and ``heads()`` fresh modules for :func:`mtnorm.models.build_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mtnorm.models.lenet import LeNetEncoder, linear_heads
from mtnorm.models.segnet import DenseHead, PooledHead, SegNet
from mtnorm.models.toy import ToyEncoder
from mtnorm.train import tasks as T
from mtnorm.train.config import Config, ConfigError


class DataUnavailableError(RuntimeError):
    """The benchmark's data cannot be loaded; the message says what is missing and where."""


@dataclass
class Split:
    """A dataset split. ``inputs``/``targets`` are whole-split tensors when the dataset exposes
    them (fast path: batches are tensor slices); otherwise ``dataset`` is used with a DataLoader."""

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
    specs: dict[str, T.TaskSpec]
    load: Callable[[Config], tuple[Split, Split]]
    backbone: Callable[[str], nn.Module]
    heads: Callable[[], dict[str, nn.Module]]


def _fashion_error(exc: Exception) -> DataUnavailableError:
    return DataUnavailableError(
        f"{exc} (install Debian's dataset-fashion-mnist with `make data`, or set MTNORM_FASHION_DIR "
        "to a folder with the four Fashion-MNIST idx files)"
    )


def _multifashion(cfg: Config) -> Benchmark:
    from mtnorm.data import MULTIFASHION_TASKS, MultiFashion

    tasks = tuple(cfg.data.tasks or MULTIFASHION_TASKS)
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        kw: dict[str, Any] = {"seed": cfg.data.seed, "root": cfg.data.root}
        if cfg.data.n_train is not None:
            kw["n_train"] = cfg.data.n_train
        if cfg.data.n_test is not None:
            kw["n_test"] = cfg.data.n_test
        try:
            train, test = MultiFashion("train", **kw), MultiFashion("test", **kw)
        except FileNotFoundError as e:
            raise _fashion_error(e) from None
        return as_split(train, tasks), as_split(test, tasks)

    return Benchmark(
        "multifashion",
        tasks,
        {t: T.classification(10) for t in tasks},
        load,
        lambda norm: LeNetEncoder(1, m.width, m.hidden, 36, norm),
        lambda: linear_heads(tasks, m.hidden, 10),
    )


def _scenes(cfg: Config) -> Benchmark:
    from mtnorm.data.scenes import ATTRIBUTE_TASKS, NUM_SEGMENT_CLASSES, FashionScenes

    tasks = tuple(cfg.data.tasks or ("segment", "depth", "normal"))
    dense = {
        "segment": (T.segmentation(NUM_SEGMENT_CLASSES), NUM_SEGMENT_CLASSES, False),
        "depth": (T.depth(), 1, False),
        "normal": (T.normal(), 3, True),
    }
    unknown = [t for t in tasks if t not in dense and t not in ATTRIBUTE_TASKS]
    if unknown:
        raise ConfigError(f"data.tasks: unknown scenes tasks {unknown}")
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        kw: dict[str, Any] = {"seed": cfg.data.seed, "root": cfg.data.root}
        if cfg.data.n_train is not None:
            kw["n_train"] = cfg.data.n_train
        if cfg.data.n_test is not None:
            kw["n_test"] = cfg.data.n_test
        try:
            train, test = FashionScenes("train", **kw), FashionScenes("test", **kw)
        except FileNotFoundError as e:
            raise _fashion_error(e) from None
        return as_split(train, tasks), as_split(test, tasks)

    def heads() -> dict[str, nn.Module]:
        return {
            t: DenseHead(m.width, dense[t][1], dense[t][2]) if t in dense else PooledHead(m.width)
            for t in tasks
        }

    specs = {t: dense[t][0] if t in dense else T.binary() for t in tasks}
    return Benchmark(
        "scenes", tasks, specs, load, lambda norm: SegNet(1, m.width, m.levels, norm), heads
    )


def _toy(cfg: Config) -> Benchmark:
    """A tiny synthetic benchmark (seconds to train) for smoke tests and examples."""
    from mtnorm.models.toy import make_toy

    tasks = tuple(cfg.data.tasks or ("a", "b"))
    m = cfg.model

    def load(cfg: Config) -> tuple[Split, Split]:
        train = make_toy(cfg.data.n_train or 256, tasks, seed=cfg.data.seed, split=0)
        test = make_toy(cfg.data.n_test or 128, tasks, seed=cfg.data.seed, split=1)
        return train_split(train, tasks), train_split(test, tasks)

    def train_split(data: tuple[torch.Tensor, dict[str, torch.Tensor]], tasks: tuple[str, ...]) -> Split:
        return Split(None, data[0], data[1])

    return Benchmark(
        "toy",
        tasks,
        {t: T.classification(3) for t in tasks},
        load,
        lambda norm: ToyEncoder(8, m.hidden, norm),
        lambda: linear_heads(tasks, m.hidden, 3),
    )


def _external(name: str, loader: str) -> Callable[[Config], Benchmark]:
    """Benchmarks whose loaders live in ``mtnorm.data`` and need user-provided files."""

    def make(cfg: Config) -> Benchmark:
        import mtnorm.data as data

        factory = getattr(data, "build_benchmark", None)
        if factory is None or not hasattr(data, loader):
            raise DataUnavailableError(
                f"benchmark {name!r}: this installation has no {loader} loader in mtnorm.data"
            )
        try:
            return factory(name, cfg)
        except FileNotFoundError as e:
            raise DataUnavailableError(f"benchmark {name!r}: {e}") from None

    return make


BENCHMARKS: dict[str, Callable[[Config], Benchmark]] = {
    "multifashion": _multifashion,
    "scenes": _scenes,
    "toy": _toy,
    "nyuv2": _external("nyuv2", "NYUv2"),
    "cityscapes": _external("cityscapes", "Cityscapes"),
    "celeba": _external("celeba", "CelebA"),
}


def get_benchmark(cfg: Config) -> Benchmark:
    """The benchmark named by ``cfg.data.name`` (a :class:`ConfigError` lists the valid names)."""
    if cfg.data.name not in BENCHMARKS:
        raise ConfigError(
            f"data.name: unknown benchmark {cfg.data.name!r}; choose one of {sorted(BENCHMARKS)}"
        )
    return BENCHMARKS[cfg.data.name](cfg)
