"""Stage 1: sentence data, teacher-file checks, the distillation step (LoRA-only, LLM-only, exact
under GradCache chunking), and the demo chain stage 1 → merged checkpoint → stage 2."""

import json
import shutil

import jax
import numpy as np
import pytest
import scipy.stats
from flax import nnx

import unime_jax.datasets as uds
from configs import stage1 as stage1_config
from configs import stage2 as stage2_config
from unime_jax import inference, sharding, stages, steps, teacher, train
from unime_jax.data.sentences import SentenceTransform, open_sentences
from unime_jax.demo.world import sets as world
from unime_jax.embedder import Embedder
from unime_jax.errors import DataError, UsageError
from unime_jax.families.llava import ONEVISION
from unime_jax.models.lora import apply_lora
from unime_jax.preprocess.text import truncate
from unime_jax.stages import distill as stage1


class HashTeacher:
    """A deterministic torch-free teacher: a random unit vector per sentence."""

    name, dim = "hash-teacher", 24

    def encode(self, sentences, instruction=None):
        seeds = [sum(map(ord, s)) for s in sentences]
        return np.stack([np.random.default_rng(s).normal(size=self.dim) for s in seeds])


def tiny_cfg(**overrides):
    cfg = stage1_config.get_config("demo")
    cfg.update(
        batch_size=16,
        num_chunks=2,
        num_steps=4,
        warmup_steps=1,
        log_every=1,
        checkpoint_every=2,
        demo_train_rows=32,
        demo_eval_size=16,
    )
    cfg.update(overrides)
    return cfg


def nli_dataset(root, rows):
    """An nli_simcse dataset of ``rows`` prepared in ``root/tfds``: (records, checksum)."""
    teacher.write_nli_csv(root / "manual" / "nli.csv", rows)
    uds.prepare("nli_simcse", data_dir=root / "tfds", manual_dir=root / "manual")
    checksum = uds.nli_simcse.recorded(data_dir=root / "tfds")["corpus_sha256"]
    return uds.source("nli_simcse", "train", data_dir=root / "tfds"), checksum


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Config overrides: 24 demo NLI rows as nli_simcse, with HashTeacher vectors."""
    root = tmp_path_factory.mktemp("corpus")
    nli_dataset(root, world.nli_rows(0, 24))
    teacher.precompute(uds.nli_corpus(data_dir=root / "tfds"), root / "t", teacher=HashTeacher())
    return {
        "corpus": "nli_simcse",
        "data_dir": str(root / "tfds"),
        "teacher_dir": str(root / "t"),
        "eval_corpus": "",
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory, corpus):
    """Text-only demo model, stage-1 data and optimiser on the 8-device mesh."""
    cfg = tiny_cfg(**corpus)
    mesh = sharding.make_mesh(dict(cfg.mesh))
    directory = train.resolve_model(cfg, str(tmp_path_factory.mktemp("demo")))
    stage = stages.get(1)
    _, _, module, processor = inference.build_model(directory, mesh, text_only=stage.text_only)
    apply_lora(module, ONEVISION.lora_targets["llm"], rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = nnx.split(module, nnx.LoRAParam, ...)
    source = stage.source(cfg)
    data = train.make_data(cfg, stage, processor, mesh, source)
    batches = [sharding.put_batch(next(data), mesh) for _ in range(2)]
    return cfg, mesh, module, processor, graphdef, trainable, frozen, batches, source


def test_truncation_keeps_the_prompt_suffix(setup):
    cfg, *_, processor = setup[:4]
    tok = processor.tokenizer
    long = " ".join(f"word{i}" for i in range(200))
    short = truncate(tok, long, 32)
    assert len(tok(short, add_special_tokens=False)["input_ids"]) == 32
    assert truncate(tok, "a red circle", 32) == "a red circle"
    transform = SentenceTransform(processor, length=cfg.text_length, max_sentence_tokens=32)
    closing = processor.text_prompt("SENTENCE").split("SENTENCE", 1)[1]  # "\nSummary above ..."
    assert transform.prompt(long).endswith(closing)
    out = transform.map({"id": "0:sent0", "sentence": long, "teacher": np.ones(5)})
    assert len(out["text"]) <= cfg.text_length and out["text"].images == []
    assert out["teacher"].dtype == np.float32
    tight = SentenceTransform(processor, length=8).map(
        {"id": "7:sent1", "sentence": long, "teacher": 0}
    )
    assert tight["_skip"] == "too_long" and tight["id"] == "7:sent1"


def test_batches_carry_teacher_vectors(setup):
    cfg, *_, batches, source = setup
    batch = batches[0]
    assert set(batch) == {"text", "teacher"}
    assert batch["text"].input_ids.shape == (cfg.batch_size, cfg.text_length)
    assert batch["text"].images is None
    assert batch["teacher"].shape == (cfg.batch_size, HashTeacher.dim)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(batch["teacher"]), axis=-1), 1, atol=1e-5)
    assert len(source) == 72  # 24 rows x (sent0, sent1, hard_neg)


def test_teacher_files_of_another_corpus_are_refused(tmp_path, corpus):
    other = nli_dataset(tmp_path / "other", world.nli_rows(5, 24))
    with pytest.raises(ValueError, match="do not belong to"):
        open_sentences(*other, corpus["teacher_dir"])
    shorter = nli_dataset(tmp_path / "short", world.nli_rows(0, 20))
    with pytest.raises(ValueError, match=r"count|checksum"):
        open_sentences(*shorter, corpus["teacher_dir"])
    with pytest.raises(ValueError, match="run the teacher precompute"):
        open_sentences(*shorter, tmp_path / "missing")


def test_only_the_llm_is_built(setup):
    module, processor = setup[2], setup[3]
    assert module.vision is None and module.projector is None and processor.layout is None
    names = {
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
    }
    assert names and all("llm" in n for n in names)


def test_step_trains_only_adapters_and_chunking_is_exact(setup):
    cfg, mesh, _, _, graphdef, trainable, frozen, batches, _ = setup
    tx = steps.make_optimizer(cfg)
    results = []
    stage = stages.get(1)
    for chunks in (1, 2):
        c = tiny_cfg(num_chunks=chunks)
        step_fn = steps.make_train_step(
            graphdef, tx, c, mesh, stage.loss_fn(c), stage.sides, trainable, frozen
        )
        state = steps.init_state(trainable, tx, 0, mesh)
        losses = []
        for batch in batches * 3:
            state, metrics = step_fn(state, frozen, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.tree.map(np.asarray, state.trainable)))
    (losses, params), (losses2, params2) = results
    assert losses[-1] < losses[0] and np.isfinite(losses).all()
    np.testing.assert_allclose(losses, losses2, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, params2)
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert names and all("lora_a" in n or "lora_b" in n for n in names)
    # The frozen LLM weights are an input of the step, never an output: they cannot change.
    assert jax.tree.structure(state.trainable) == jax.tree.structure(trainable)


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=300), rng.normal(size=300)
    b = a + 0.5 * b
    assert stage1.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b).statistic, abs=1e-9)


def test_config_validation(tmp_path, corpus):
    mesh = sharding.make_mesh()
    real = stage1_config.get_config()
    real.model = "/some/model"
    real.data_dir = str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"nli_simcse/1\.0\.0 is not prepared") as e:
        train.validate(real, mesh, stages.get(1))
    assert "python -m unime_jax.datasets build nli_simcse" in e.value.fix
    real.data_dir = corpus["data_dir"]
    with pytest.raises(UsageError, match="teacher_dir='' is not a directory") as e:
        train.validate(real, mesh, stages.get(1))
    assert "python -m unime_jax.teacher --dataset nli_simcse" in e.value.fix
    real.corpus = "nli_simcse:nope"
    with pytest.raises(UsageError, match="no split 'nope'"):
        train.validate(real, mesh, stages.get(1))
    real.corpus = "csv/nli.csv"
    with pytest.raises(UsageError, match="does not name a dataset"):
        train.validate(real, mesh, stages.get(1), check_files=False)
    with pytest.raises(ValueError, match="unknown stage-1 preset"):
        stage1_config.get_config("nope")


@pytest.mark.slow
def test_demo_chain_stage1_merged_then_stage2(tmp_path):
    """Stage-1 demo (real MiniLM teacher) → WORKDIR/merged → stage 2 starts from it."""
    s1 = tmp_path / "s1"
    results = train.run(tiny_cfg(), str(s1))
    assert set(results["before"]) >= {"spearman", "kd_loss", "hard_neg_acc"}
    assert results["after"]["kd_loss"] < results["before"]["kd_loss"]
    merged = s1 / "merged"
    assert json.loads((s1 / "results.json").read_text())["merged"] == str(merged)

    # Merge then reload equals the trained (unmerged LoRA) forward: same agreement numbers.
    model = inference.load_pretrained(merged, mesh=sharding.make_mesh(), text_only=True)
    cfg = stages.get(1).prepare(tiny_cfg(), str(s1))  # finds the teacher files it wrote
    eval_set = stage1.open_corpus(cfg, "eval_corpus")
    reloaded = stage1.teacher_agreement(
        Embedder(model, batch_size=64, progress=False),
        eval_set,
        max_sentence_tokens=cfg.max_sentence_tokens,
        cfg=cfg,
    )
    assert reloaded["kd_loss"] == pytest.approx(results["after"]["kd_loss"], rel=1e-4)
    assert reloaded["spearman"] == pytest.approx(results["after"]["spearman"], abs=1e-4)

    # The vision tower and projector are the base model's, byte for byte.
    from safetensors.numpy import load_file

    base = load_file(s1 / "demo_base" / "model.safetensors")
    out = load_file(merged / "model.safetensors")
    vision = [k for k in base if "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and all(np.array_equal(base[k], out[k]) for k in vision)
    llm = [k for k in base if "language_model" in k and "q_proj.weight" in k]
    assert any(not np.array_equal(base[k], out[k]) for k in llm)  # the LoRA was folded in

    s2 = stage2_config.get_config("demo")
    s2.update(
        model=str(merged),
        batch_size=16,
        num_chunks=2,
        num_steps=2,
        warmup_steps=1,
        demo_train_rows=32,
        demo_eval_size=0,
        query_length=48,
        target_length=48,
    )
    assert train.run(s2, str(tmp_path / "s2"))["steps"] == 2


def test_resume_continues_exactly(tmp_path, corpus):
    """The shared loop resumes stage 1 too: sentence-iterator state and train state restored."""
    cfg = tiny_cfg(**corpus, export_merged=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(cfg, str(straight))
    train.run(cfg, str(resumed))
    assert (resumed / "checkpoints" / "2").is_dir()  # otherwise the rerun would start afresh
    shutil.rmtree(resumed / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
    (resumed / "final_state_digest.json").unlink()  # the rerun must write its own
    train.run(cfg, str(resumed))
    digest = [json.loads((d / "final_state_digest.json").read_text()) for d in (straight, resumed)]
    assert digest[0] == digest[1] and digest[0]["step"] == 4
