"""What a trainer needs per task: head size, loss kind and a metric accumulator.

``TaskSpec.kind`` tells the trainer which loss to use:

* ``classification`` - cross-entropy on logits [B, num_outputs], target long [B];
* ``segmentation`` - pixel-wise cross-entropy on [B, num_outputs, H, W], target long [B, H, W]
  (``ignore_index`` pixels skipped);
* ``depth`` - L1 on [B, 1, H, W] over valid pixels (target != 0 for real data);
* ``normal`` - 1 - cosine similarity on [B, 3, H, W] after normalizing the prediction;
* ``binary`` - BCE-with-logits on [B] (or [B, 1]), float target in {0, 1};
* ``regression`` - L1 on [B, num_outputs].

``metric()`` builds a fresh accumulator from :mod:`mtnorm.metrics`; ``primary_metric`` names the
value to report per task (its direction is ``metric().higher_is_better[primary_metric]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from mtnorm import metrics as M

KINDS = ("classification", "segmentation", "depth", "normal", "binary", "regression")


@dataclass(frozen=True)
class TaskSpec:
    """One task's output size, loss kind and metric factory."""

    kind: str
    num_outputs: int
    metric: Callable[[], M.Metric]
    primary_metric: str
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def higher_is_better(self) -> bool:
        """Direction of the primary metric."""
        return self.metric().higher_is_better[self.primary_metric]


def classification(num_classes: int) -> TaskSpec:
    return TaskSpec("classification", num_classes, M.Accuracy, "accuracy")


def segmentation(num_classes: int, ignore_index: int = -1) -> TaskSpec:
    factory = partial(M.SegmentationMetric, num_classes, ignore_index)
    return TaskSpec("segmentation", num_classes, factory, "miou", ignore_index)


def depth() -> TaskSpec:
    return TaskSpec("depth", 1, M.DepthMetric, "abs_err")


def normal() -> TaskSpec:
    return TaskSpec("normal", 3, M.NormalMetric, "mean")


def binary() -> TaskSpec:
    return TaskSpec("binary", 1, M.BinaryF1, "f1")


def regression(num_outputs: int = 1) -> TaskSpec:
    return TaskSpec("regression", num_outputs, M.MAE, "mae")


def multifashion_specs(tasks: tuple[str, ...] | None = None) -> dict[str, TaskSpec]:
    """MultiFashion: two 10-way classification tasks and the 10 binary has_<class> attributes.

    ``tasks=None`` gives all 12; the benchmark's default selection is ``("left", "right")``.
    """
    from mtnorm.data.multifashion import MULTIFASHION_ATTRIBUTE_TASKS

    specs = {"left": classification(10), "right": classification(10)}
    specs.update({task: binary() for task in MULTIFASHION_ATTRIBUTE_TASKS})
    return _select(specs, tasks)


def fashion_scenes_specs(tasks: tuple[str, ...] | None = None) -> dict[str, TaskSpec]:
    """FashionScenes: segment (11 classes), depth, normal, and the 10 has_<class> attributes."""
    from mtnorm.data.scenes import ATTRIBUTE_TASKS, NUM_SEGMENT_CLASSES

    specs = {"segment": segmentation(NUM_SEGMENT_CLASSES), "depth": depth(), "normal": normal()}
    specs.update({task: binary() for task in ATTRIBUTE_TASKS})
    return _select(specs, tasks)


def nyuv2_specs() -> dict[str, TaskSpec]:
    """NYUv2 (MTAN preprocessing): 13-class segmentation, depth, normal."""
    return {"segmentation": segmentation(13), "depth": depth(), "normal": normal()}


def cityscapes_specs() -> dict[str, TaskSpec]:
    """Cityscapes (MTAN release): 7-class segmentation and depth."""
    return {"segmentation": segmentation(7), "depth": depth()}


def celeba_specs(attributes: tuple[str, ...]) -> dict[str, TaskSpec]:
    """CelebA: one binary task per attribute (mean F1 over tasks is the CelebA score)."""
    return {name: binary() for name in attributes}


def office_specs(domains: tuple[str, ...], num_classes: int) -> dict[str, TaskSpec]:
    """Office-31 / Office-Home: one classification task per domain."""
    return {domain: classification(num_classes) for domain in domains}


def qm9_specs(targets: tuple[str, ...]) -> dict[str, TaskSpec]:
    """QM9: one scalar regression task per target."""
    return {name: regression(1) for name in targets}


def _select(specs: dict[str, TaskSpec], tasks: tuple[str, ...] | None) -> dict[str, TaskSpec]:
    if tasks is None:
        return specs
    unknown = [t for t in tasks if t not in specs]
    if unknown:
        raise KeyError(f"unknown tasks {unknown}; available: {list(specs)}")
    return {t: specs[t] for t in tasks}
