"""The teacher-embedding output directory: its file names and durable (atomic) writes.

See the package docstring (:mod:`unime_jax.teacher`) for what each file holds.
"""

from __future__ import annotations

import os
from pathlib import Path

FORMAT_VERSION = 1

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "corpus_report.json"
INVALID_FILE = "invalid_rows.json"
_OUTPUT_FILES = (EMBEDDINGS_FILE, IDS_FILE, MANIFEST_FILE, PROGRESS_FILE, REPORT_FILE, INVALID_FILE)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
