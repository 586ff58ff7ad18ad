"""Stage 1: textual discriminative knowledge distillation into the LLM (UniME §stage 1).

Data: a prepared sentence dataset, ``corpus`` (``nli_simcse``; the demo's ``shapes_world/nli``)
with its precomputed teacher vectors (``teacher_dir``: ``python -m unime_jax.teacher``); only the
LLM is built. Loss: :func:`unime_jax.losses.similarity_kd` between the student's and the
teacher's in-batch similarity distributions. The demo computes its MiniLM teacher files itself
(:func:`prepare_demo_teachers`); the held-out evidence is :func:`teacher_agreement` (how well the
student's pairwise similarities on held-out sentences track the teacher's).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import unime_jax.datasets as uds
from unime_jax import losses
from unime_jax import teacher as teacher_store
from unime_jax.data import sentences
from unime_jax.data.sentences import SentenceSource, SentenceTransform, open_sentences
from unime_jax.errors import DataError, UsageError
from unime_jax.files import locked
from unime_jax.preprocess.text import truncate
from unime_jax.stages import datasets
from unime_jax.stages.base import Stage

log = logging.getLogger(__name__)

NLI_COLUMNS = ("sent0", "sent1", "hard_neg")
CORPORA = {"corpus": "teacher_dir", "eval_corpus": "eval_teacher_dir"}  # dataset -> its teacher


def prepare_demo_teachers(cfg, workdir: str | os.PathLike) -> dict[str, str]:
    """MiniLM teacher embeddings of the generated corpora (the shapes world's sentences) whose
    ``teacher_dir`` is not set, under ``workdir/demo_data``; reruns reuse (and resume) them.

    Returns the teacher directories as config overrides. The teacher runs in PyTorch
    (``requirements-dev.txt``); a TPU host that trains on precomputed teacher files never needs
    it.
    """
    out = {}
    for key, teacher_key in CORPORA.items():
        if not cfg[key] or cfg[teacher_key]:
            continue
        dataset = datasets.ref(cfg, key)
        if dataset.name not in datasets.GENERATED:
            continue
        datasets.prepare(cfg, dataset)
        config, split = datasets.builder_config(cfg, dataset), dataset.split or "train"
        teacher_dir = Path(workdir, "demo_data", f"teacher_{config.name}_{split}")
        with locked(teacher_dir.parent / ".teacher.lock"):  # one process computes it
            done = (teacher_dir / teacher_store.MANIFEST_FILE).exists() and (
                teacher_store.Manifest.load(teacher_dir).completed
            )
            if not done:
                corpus = uds.nli_corpus(
                    dataset.name, data_dir=datasets.data_dir(cfg), config=config, split=split
                )
                try:
                    teacher_store.precompute(
                        corpus, teacher_dir, teacher=cfg.demo_teacher, batch_size=256
                    )
                except ImportError as e:
                    raise UsageError(
                        f"the stage-1 demo computes its teacher embeddings with PyTorch ({e})",
                        "install the dev requirements: pip install -r requirements-dev.txt",
                    ) from e
        out[teacher_key] = str(teacher_dir)
    return out


def open_corpus(cfg, key: str) -> SentenceSource:
    """The sentences of ``cfg[key]`` with the teacher vectors of its ``teacher_dir``."""
    dataset = datasets.ref(cfg, key)
    config, split = datasets.builder_config(cfg, dataset), dataset.split or "train"
    recorded = uds.nli_simcse.recorded(
        dataset.name, data_dir=datasets.data_dir(cfg), config=config, split=split
    )
    return open_sentences(
        datasets.source(cfg, dataset, "train", uds.nli_simcse.item),
        recorded["corpus_sha256"],
        cfg[CORPORA[key]],
        cfg.teacher_bad_rows,
        name=str(dataset),
    )


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
    items = [source[i] for i in range(len(source))]  # the usable rows
    sentences = [truncate(tok, item["sentence"], max_sentence_tokens) for item in items]
    student = embedder.embed_texts(sentences)
    teacher = np.stack([np.asarray(item["teacher"], np.float32) for item in items])
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
    for i, item in enumerate(items):
        row, _, column = item["id"].partition(":")
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
        cfg = cfg.copy_and_resolve_references()
        if cfg.eval_corpus.startswith(datasets.GENERATED) and cfg.demo_eval_size <= 0:
            cfg.eval_corpus = ""  # a demo without held-out sentences
        cfg.update(prepare_demo_teachers(cfg, workdir))
        return cfg

    def validate(self, cfg, *, check_files: bool = True) -> None:
        if cfg.kd_direction not in losses.KD_DIRECTIONS:
            raise UsageError(
                f"--config.kd_direction={cfg.kd_direction!r}", f"use one of {losses.KD_DIRECTIONS}"
            )
        if cfg.teacher_bad_rows not in ("error", "skip"):
            raise UsageError(
                f"--config.teacher_bad_rows={cfg.teacher_bad_rows!r}", "use error or skip"
            )
        for key in ("kd_temperature", "max_sentence_tokens"):
            if not cfg[key] > 0:
                raise UsageError(f"--config.{key}={cfg[key]!r} is out of range", "it must be > 0")
        if not cfg.num_steps and cfg.num_epochs <= 0:
            raise UsageError("set num_steps or num_epochs (> 0)")
        corpora = [key for key in CORPORA if key == "corpus" or cfg[key]]
        for key in corpora:
            datasets.ref(cfg, key)
        if not check_files:
            return
        for key in corpora:
            datasets.check_prepared(cfg, datasets.ref(cfg, key), "train", uds.nli_simcse.item)
            teacher_dir = cfg[CORPORA[key]]
            if not teacher_dir or not os.path.isdir(teacher_dir):
                raise UsageError(
                    f"--config.{CORPORA[key]}={teacher_dir!r} is not a directory",
                    f"compute the teacher embeddings of {cfg[key]} first: `python -m "
                    f"unime_jax.teacher --dataset {cfg[key]} --out TEACHER_DIR` (add --data_dir "
                    "as for training), and pass TEACHER_DIR",
                )

    def source(self, cfg) -> SentenceSource:
        return open_corpus(cfg, "corpus")

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
        held_out = open_corpus(cfg, "eval_corpus")
        return lambda embedder: teacher_agreement(
            embedder, held_out, max_sentence_tokens=cfg.max_sentence_tokens, cfg=cfg
        )
