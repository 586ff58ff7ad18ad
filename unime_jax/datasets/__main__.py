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


def _check(args) -> None:
    """Dataset names and ``--config`` checked against our builders before TFDS runs (TFDS's own
    errors for these are tracebacks that list every dataset in its catalogue)."""
    from unime_jax.datasets import BUILDERS

    classes = {b.name: b for b in BUILDERS}
    names = [*args.positional_datasets, *args.datasets]
    if not names:
        raise UsageError(f"no dataset named: {USAGE}", f"NAME is one of {sorted(classes)}")
    config = args.generation.config
    for text in names:
        name, _, named_config = text.partition(":")[0].partition("/")
        if name not in classes:
            raise UsageError(f"no dataset builder named {name!r}", f"use one of {sorted(classes)}")
        for wanted in (named_config, config):
            custom = wanted and wanted.lstrip().startswith("{")  # TFDS: a JSON custom config
            if wanted and not custom and wanted not in classes[name].builder_configs:
                raise UsageError(
                    f"{name} has no config {wanted!r}",
                    f"use one of {sorted(classes[name].builder_configs)}",
                )


def _main(args) -> None:
    from absl import logging

    import unime_jax.datasets  # noqa: F401  (registers the builders)

    logging.set_verbosity(logging.INFO)

    def build() -> None:
        _check(args)
        args.execute()

    sys.exit(run_main(build))


if __name__ == "__main__":
    app.run(_main, flags_parser=_parse)
