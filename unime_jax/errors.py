"""One error discipline for every entry point.

A problem the user can fix (a flag, a config value, a path, a damaged file or row) is a
:class:`UserError`: the entry point prints ``error: <what, where>`` and ``Fix: <what to do>`` and
exits with 2 (:class:`UsageError`: flags and config) or 1 (:class:`DataError`: files, data,
checkpoints), without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """A failure the user can fix. ``fix`` says how (optional: some messages say it inline)."""

    exit_code = 1

    def __init__(self, what: str, fix: str = ""):
        super().__init__(what)
        self.what = what
        self.fix = fix

    def __str__(self) -> str:
        return self.what if not self.fix else f"{self.what}\nFix: {self.fix}"


class UsageError(UserError, ValueError):
    """Wrong flags or config values (exit status 2)."""

    exit_code = 2


class DataError(UserError, ValueError):
    """Missing, damaged or inconsistent files, rows and checkpoints (exit status 1)."""

    exit_code = 1


def report(error: UserError) -> str:
    """The two lines an entry point prints: ``error: ...`` and ``Fix: ...``."""
    lines = [f"error: {error.what}"]
    if error.fix:
        lines.append(f"Fix: {error.fix}")
    return "\n".join(lines)


def run_main(main: Callable[[], int | None]) -> int:
    """Runs ``main``; a :class:`UserError` becomes its report on stderr and its exit status."""
    try:
        return main() or 0
    except UserError as e:
        logging.shutdown()
        print(report(e), file=sys.stderr)
        return e.exit_code
