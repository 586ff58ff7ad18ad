"""One error discipline for every entry point.

A problem the user can fix (a flag, a config value, a path, a damaged file or row) is a
:class:`UserError`: the entry point prints ``error: <what, where>`` and ``Fix: <what to do>`` and
exits with 2 (:class:`UsageError`: flags and config) or 1 (:class:`DataError`: files, data,
checkpoints), without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's usage-error format: ``error:`` / ``Fix:``, exit status 2."""

    def error(self, message: str):
        print(report(UsageError(message, f"see `{self.prog} --help`")), file=sys.stderr)
        sys.exit(UsageError.exit_code)


# What parsing absl flags and ``--config.KEY=VALUE`` overrides raises on bad input (besides
# ``absl.flags.Error``, added where absl is imported).
FLAG_ERRORS: tuple[type[Exception], ...] = (
    AttributeError,
    KeyError,
    ValueError,
    TypeError,
    OSError,
)


def flags_parser(fix: str) -> Callable[[list[str]], list[str]]:
    """An ``absl.app.run`` flags parser that turns a bad flag or ``--config.KEY=VALUE`` override
    (unknown key, unparsable value, missing config file) into ``error:`` / ``Fix:`` and exit 2."""

    def parse(argv: list[str]) -> list[str]:
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except (flags.Error, *FLAG_ERRORS) as e:
            print(report(bad_flag(e, fix)), file=sys.stderr)
            sys.exit(UsageError.exit_code)

    return parse


def bad_flag(error: Exception, fix: str) -> UsageError:
    """The usage error of a flag or override that did not parse (absl's message, shortened)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    what = lines[0] if lines else type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):  # a config file's own error: its last line
        what = f"{lines[0].rstrip(':')}: {lines[-1]}"
    if isinstance(error, AttributeError | KeyError):
        what = f"unknown config key {what.strip(chr(34) + chr(39))!r}"
    return UsageError(f"bad flag: {what}", fix)


def config_value(flag):
    """The config of a ``DEFINE_config_file`` flag; a missing or broken file is a usage error."""
    try:
        cfg = flag.value
        if cfg is not None:
            cfg.keys()  # a config file that failed to load raises only when first touched
    except (OSError, SyntaxError, ValueError, AttributeError) as e:
        first = str(e).strip().splitlines()
        raise UsageError(
            f"--{flag.name}: {' '.join(line.strip() for line in first[-2:])}",
            "pass an existing configs/*.py file, optionally with :preset",
        ) from e
    if cfg is None:
        raise UsageError(f"--{flag.name} is required", "e.g. --config=configs/stage2.py:demo")
    return cfg


def run_main(main: Callable[[], int | None]) -> int:
    """Runs ``main``; a :class:`UserError` becomes its report on stderr and its exit status."""
    try:
        return main() or 0
    except UserError as e:
        for handler in logging.getLogger().handlers:  # earlier log lines first, then the error
            handler.flush()
        print(report(e), file=sys.stderr)
        return e.exit_code
