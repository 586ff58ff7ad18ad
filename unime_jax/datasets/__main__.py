"""``python -m unime_jax.datasets build NAME [--config C] --manual_dir DIR --data_dir DATA``:
TFDS's ``tfds build`` with the UniME builders registered, with all of its flags
(``--overwrite``, ``--beam_pipeline_options=runner=DirectRunner,...``, ``--config_idx``, ...).

Why not the ``tfds`` command itself: tensorflow-datasets 4.9.10 imports TensorFlow when that
command starts (for its ``convert_format`` subcommand), and this project runs without
TensorFlow; ``build`` does not need it, and it is what runs here.
"""

from __future__ import annotations

import sys

from absl import app

from unime_jax.errors import UsageError, report, run_main

USAGE = "python -m unime_jax.datasets build NAME [--config C] --manual_dir DIR --data_dir DATA"


def _parse(argv: list[str]):
    from tensorflow_datasets.scripts.cli import build, cli_utils

    if len(argv) < 2 or argv[1] != "build":
        print(report(UsageError(f"usage: {USAGE}", "see `... build --help`")), file=sys.stderr)
        sys.exit(UsageError.exit_code)
    parse = cli_utils.make_flags_parser(build.Args, description=__doc__)
    return parse([f"{argv[0]} build", *argv[2:]])


def _main(args) -> None:
    from absl import logging

    import unime_jax.datasets  # noqa: F401  (registers the builders)

    logging.set_verbosity(logging.INFO)
    sys.exit(run_main(args.execute))


if __name__ == "__main__":
    app.run(_main, flags_parser=_parse)
