"""The teacher-embedding output directory: its file names and durable (atomic) writes.

See the package docstring (:mod:`unime_jax.teacher`) for what each file holds.
"""

from __future__ import annotations

FORMAT_VERSION = 1

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "corpus_report.json"
INVALID_FILE = "invalid_rows.json"
_OUTPUT_FILES = (EMBEDDINGS_FILE, IDS_FILE, MANIFEST_FILE, PROGRESS_FILE, REPORT_FILE, INVALID_FILE)
