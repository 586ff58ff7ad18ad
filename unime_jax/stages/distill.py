"""Stage 1: textual discriminative knowledge distillation into the LLM (UniME §stage 1).

Data: sentences with precomputed teacher vectors (:mod:`unime_jax.data.sentences`); only the LLM
is built. Loss: :func:`unime_jax.losses.similarity_kd` between the student's and the teacher's
in-batch similarity distributions. The offline demo writes its own corpus and MiniLM teacher
files (:func:`prepare_demo`); the held-out evidence is :func:`teacher_agreement` (how well the
student's pairwise similarities on held-out sentences track the teacher's).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from unime_jax import losses
from unime_jax import teacher as teacher_store
from unime_jax.data import sentences
from unime_jax.data.sentences import SentenceSource, SentenceTransform, open_sentences
from unime_jax.demo.world import sets as world
from unime_jax.errors import DataError, UsageError
from unime_jax.files import atomic_write
from unime_jax.preprocess.text import truncate
from unime_jax.stages.base import Stage

log = logging.getLogger(__name__)

NLI_COLUMNS = ("sent0", "sent1", "hard_neg")


def write_nli_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> Path:
    """Writes rows in the SimCSE NLI CSV layout (atomically)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=NLI_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, text.getvalue())


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
            write_nli_csv(corpus, world.nli_rows(seed, n, held_out=held_out))
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
                raise UsageError(
                    f"the stage-1 demo computes its teacher embeddings with PyTorch ({e})",
                    "install the dev requirements: pip install -r requirements-dev.txt",
                ) from e
        out[prefix + "corpus"], out[prefix + "teacher_dir"] = str(corpus), str(teacher_dir)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equal-length vectors (ties broken by position: the
    similarities compared here are continuous)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def teacher_agreement(
    embedder, source: SentenceSource, *, max_sentence_tokens: int, cfg
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


class Distillation(Stage):
    number = 1
    sides = (sentences.SIDE,)
    text_only = True
    skip_reasons = sentences.REASONS

    def prepare(self, cfg, workdir: str):
        if cfg.corpus != "demo":
            return cfg
        cfg = cfg.copy_and_resolve_references()
        cfg.update(prepare_demo(cfg, workdir))
        return cfg

    def validate(self, cfg, *, check_files: bool = True) -> None:
        if cfg.kd_direction not in losses.KD_DIRECTIONS:
            raise UsageError(
                f"--config.kd_direction={cfg.kd_direction!r}", f"use one of {losses.KD_DIRECTIONS}"
            )
        for key in ("kd_temperature", "max_sentence_tokens"):
            if not cfg[key] > 0:
                raise UsageError(f"--config.{key}={cfg[key]!r} is out of range", "it must be > 0")
        if not cfg.num_steps and cfg.num_epochs <= 0:
            raise UsageError("set num_steps or num_epochs (> 0)")
        if not check_files:
            return
        for field in ("corpus", "teacher_dir"):
            if not cfg[field] or not os.path.exists(cfg[field]):
                raise UsageError(
                    f"--config.{field}={cfg[field]!r} does not exist",
                    "stage 1 needs the corpus and its teacher embeddings from `python -m "
                    "unime_jax.teacher --corpus CORPUS --out TEACHER_DIR`",
                )

    def source(self, cfg) -> SentenceSource:
        return open_sentences(cfg.corpus, cfg.teacher_dir)

    def lengths(self, cfg) -> dict[str, int]:
        return {sentences.SIDE: cfg.text_length}

    def transform(self, cfg, processor):
        return SentenceTransform(
            processor, length=cfg.text_length, max_sentence_tokens=cfg.max_sentence_tokens
        )

    def num_steps(self, cfg, num_rows: int) -> int:
        if cfg.num_steps:
            return cfg.num_steps
        steps = cfg.num_epochs * num_rows // cfg.batch_size
        if steps <= 0:
            raise DataError(
                f"{num_rows} sentences make no batch of {cfg.batch_size}",
                "use a larger corpus or a smaller --config.batch_size",
            )
        log.info("%d epochs of %d sentences = %d steps", cfg.num_epochs, num_rows, steps)
        return steps

    def extras(self, cfg) -> dict:
        return {"teacher": ((cfg.teacher_dim,), np.float32)}

    def loss_fn(self, cfg):
        def distill(embs, extras, step):
            del step
            loss = losses.similarity_kd(
                embs[sentences.SIDE],
                extras["teacher"],
                temperature=cfg.kd_temperature,
                direction=cfg.kd_direction,
                keep_diagonal=cfg.kd_keep_diagonal,
            )
            return loss, {"kd_loss": loss}

        return distill

    def evaluator(self, cfg):
        if not cfg.eval_corpus:
            return None
        held_out = open_sentences(cfg.eval_corpus, cfg.eval_teacher_dir)
        return lambda embedder: teacher_agreement(
            embedder, held_out, max_sentence_tokens=cfg.max_sentence_tokens, cfg=cfg
        )
