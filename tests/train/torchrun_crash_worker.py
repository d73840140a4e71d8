"""A torchrun worker that trains like ``mtnorm train CONFIG`` until rank ``RANK`` dies by SIGKILL
right after optimizer step ``STEP``: a hard crash (no signal handler, no final checkpoint), as
when a node is lost. Usage: ``torchrun ... torchrun_crash_worker.py CONFIG RANK STEP``."""

from __future__ import annotations

import os
import signal
import sys

from mtnorm.train import Trainer, load_config


def main(config: str, rank: int, step: int) -> None:
    def crash(trainer: Trainer) -> None:
        if trainer.world.rank == rank and trainer.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    Trainer(load_config(config), callbacks=[crash], log=None).fit()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
