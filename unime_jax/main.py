"""Entry point: ``python -m unime_jax.main --config=configs/stage{1,2}.py[:preset] --workdir=DIR``.

Overrides use ml_collections syntax, e.g. ``--config.lr=2e-5 --config.mesh.tensor=4``.
On a multi-host TPU slice every host runs the same command (see tpu_scripts/). User errors
(flags, config values, missing data or checkpoints) end in ``error: ...`` / ``Fix: ...`` and exit
status 2 (usage) or 1 (data), without a traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from unime_jax.errors import UsageError, config_value, flags_parser, run_main

_FIX = (
    "check the flag against `python -m unime_jax.main --helpfull` and the keys of "
    "configs/stage1.py / configs/stage2.py"
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file, optionally :preset."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and results go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: on TPU with several hosts)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run off TPU pods."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def train() -> None:
    cfg = config_value(_CONFIG)
    if not _WORKDIR.value:
        raise UsageError(
            "--config and --workdir are required",
            "pass both, e.g. --config=configs/stage2.py:demo --workdir=runs/demo",
        )
    distributed = _DISTRIBUTED.value
    if distributed is None:
        distributed = (
            "TPU_WORKER_HOSTNAMES" in os.environ or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ
        )
    if _COORDINATOR.value:  # e.g. several processes on one machine, or hosts without TPU metadata
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            raise UsageError(
                "--coordinator_address needs --num_processes and --process_id",
                "pass all three on every process (process ids 0 .. num_processes - 1)",
            )
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif distributed:
        jax.distributed.initialize()
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/unime_jax/jax"))
    from unime_jax import train as trainer

    trainer.run(cfg, _WORKDIR.value)


def main(argv: list[str]) -> None:
    del argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    sys.exit(run_main(train))


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_FIX))
