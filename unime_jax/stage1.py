"""Stage 1 specifics: sentence data with teacher vectors, the demo corpus, teacher agreement.

The loop itself is :func:`unime_jax.train.run` (shared with stage 2); this module supplies what
differs: the data (:func:`make_data`), how the offline demo gets its corpus and MiniLM teacher
(:func:`prepare_demo`), and the evidence that distillation worked (:func:`teacher_agreement`:
how well the student's pairwise similarities on held-out sentences track the teacher's).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from unime_jax import losses
from unime_jax import teacher as teacher_store
from unime_jax.data import shapes
from unime_jax.data.pipeline import make_batch_iterator
from unime_jax.data.sentences import SentenceSource, SentenceTransform, open_sentences, truncate
from unime_jax.embedder import Embedder
from unime_jax.processing import Processor

log = logging.getLogger(__name__)

NLI_COLUMNS = ("sent0", "sent1", "hard_neg")


def write_nli_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> Path:
    """Writes rows in the SimCSE NLI CSV layout (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=NLI_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def prepare_demo(cfg, workdir: str | os.PathLike) -> dict[str, str]:
    """Demo corpus (train + held-out NLI CSVs from the shapes world) and their MiniLM teacher
    embeddings under ``workdir/demo_data``; reruns reuse (and resume) what is there.

    Returns the paths as config overrides: corpus, teacher_dir, eval_corpus, eval_teacher_dir.
    The teacher runs in PyTorch (``requirements-dev.txt``); a TPU host that trains on
    precomputed teacher files never needs it.
    """
    root = Path(workdir) / "demo_data"
    sets = {
        "": (cfg.demo_train_rows, False, cfg.seed),
        "eval_": (cfg.demo_eval_size, True, cfg.seed + 1),
    }
    out = {}
    for prefix, (n, held_out, seed) in sets.items():
        name = "eval" if held_out else "train"
        corpus = root / f"{name}.csv"
        if not corpus.exists():
            write_nli_csv(corpus, shapes.nli_rows(seed, n, held_out=held_out))
        teacher_dir = root / f"teacher_{name}"
        manifest = teacher_dir / teacher_store.MANIFEST_FILE
        if not manifest.exists() or not teacher_store.Manifest.load(teacher_dir).completed:
            try:
                teacher_store.precompute(
                    teacher_store.read_corpus(corpus, verbose=False),
                    teacher_dir,
                    teacher=cfg.demo_teacher,
                    batch_size=256,
                )
            except ImportError as e:
                raise ImportError(
                    f"the stage-1 demo computes its teacher embeddings with PyTorch ({e}); "
                    "install the dev requirements: pip install -r requirements-dev.txt"
                ) from e
        out[prefix + "corpus"], out[prefix + "teacher_dir"] = str(corpus), str(teacher_dir)
    return out


def make_data(cfg, processor: Processor):
    """The stage-1 batch iterator and its source (for epoch-based step counts)."""
    source = open_sentences(cfg.corpus, cfg.teacher_dir)
    transform = SentenceTransform(
        processor, length=cfg.text_length, max_sentence_tokens=cfg.max_sentence_tokens
    )
    data = make_batch_iterator(
        source,
        transform,
        global_batch_size=cfg.batch_size,
        seed=cfg.seed,
        worker_count=cfg.worker_count,
    )
    return data, source


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length vectors (ties broken by position: the
    similarities compared here are continuous)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def teacher_agreement(
    embedder: Embedder, source: SentenceSource, *, max_sentence_tokens: int, cfg
) -> dict[str, float]:
    """How closely the student's similarity structure on ``source`` follows the teacher's.

    ``spearman``: rank correlation of all off-diagonal pairwise similarities (student vs
    teacher); ``kd_loss``: the stage-1 loss on the whole set as one batch; ``hard_neg_acc``:
    for NLI rows, the share where the student ranks ``sent1`` above ``hard_neg`` for ``sent0``
    (the teacher's own share is given as ``teacher_hard_neg_acc``).
    """
    tok = embedder.processor.tokenizer
    sentences = [truncate(tok, s, max_sentence_tokens) for _, s in source.corpus]
    student = embedder.embed_texts(sentences)
    teacher = np.asarray(source.teacher, np.float32)
    off = ~np.eye(len(sentences), dtype=bool)
    out = {
        "spearman": spearman((student @ student.T)[off], (teacher @ teacher.T)[off]),
        "kd_loss": float(
            losses.similarity_kd(
                jnp.asarray(student),
                jnp.asarray(teacher),
                temperature=cfg.kd_temperature,
                direction=cfg.kd_direction,
                keep_diagonal=cfg.kd_keep_diagonal,
            )
        ),
    }
    rows: dict[str, dict[str, int]] = {}
    for i, (row_id, _) in enumerate(source.corpus):
        row, _, column = row_id.partition(":")
        rows.setdefault(row, {})[column] = i
    triples = [tuple(r[c] for c in NLI_COLUMNS) for r in rows.values() if len(r) == 3]
    if triples:
        a, p, n = (np.array(x) for x in zip(*triples))
        for name, emb in (("hard_neg_acc", student), ("teacher_hard_neg_acc", teacher)):
            wins = np.sum(emb[a] * emb[p], -1) > np.sum(emb[a] * emb[n], -1)
            out[name] = float(100 * np.mean(wins))
    return out


def open_eval_set(cfg) -> SentenceSource | None:
    """The held-out sentences for :func:`teacher_agreement`, when configured."""
    if not cfg.eval_corpus:
        return None
    return open_sentences(cfg.eval_corpus, cfg.eval_teacher_dir)
