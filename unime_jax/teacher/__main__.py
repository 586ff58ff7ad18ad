"""``python -m unime_jax.teacher``: see :func:`unime_jax.teacher.cli.main`."""

import sys

from unime_jax.teacher.cli import main

if __name__ == "__main__":
    sys.exit(main())
