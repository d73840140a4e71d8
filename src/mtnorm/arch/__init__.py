"""Multi-task architectures beside hard sharing: soft sharing (Cross-Stitch, MTAN), experts (MMoE,
CGC, PLE, DSelect-k) and learned branching (LTB), each on any backbone cut into stages
(:mod:`mtnorm.arch.stages`), each registered as a method of :func:`mtnorm.models.build_method`."""

from mtnorm.arch.base import Architecture, TaskModules, active_tasks
from mtnorm.arch.stages import Stage, run_stages, stage_shapes, stages_of

# architectures (each module registers its methods on import)
from mtnorm.arch import cross_stitch, ltb, mtan  # noqa: F401  # isort: skip
from mtnorm.arch import dselect_k, mmoe, ple  # noqa: F401  # isort: skip

__all__ = ["Architecture", "Stage", "TaskModules", "active_tasks", "run_stages", "stage_shapes", "stages_of"]
