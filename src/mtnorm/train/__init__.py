"""Training: YAML configs, the trainer, checkpoints, distributed runs and reports.

>>> cfg = mtnorm.train.load_config("configs/multifashion.yaml")
>>> result = mtnorm.train.Trainer(cfg).fit()
"""

from mtnorm.train.benchmarks import BENCHMARKS, Benchmark, DataUnavailableError, get_benchmark
from mtnorm.train.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    config_from_dict,
    load_config,
    to_dict,
)
from mtnorm.train.trainer import RunResult, Trainer, TrainingError

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataUnavailableError",
    "ModelConfig",
    "OptimConfig",
    "RunResult",
    "Trainer",
    "TrainingError",
    "config_from_dict",
    "get_benchmark",
    "load_config",
    "to_dict",
]
