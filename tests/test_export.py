"""Export to Hugging Face and PEFT: transformers loads what we write, cleanly, and computes what we
compute; our loader reads it back bit for bit.

Models are tiny random checkpoints (``tests/hf_fixtures.py``) loaded on the 8-device mesh, with
LoRA adapters whose B is perturbed away from zero so that a missing or mis-scaled merge shows.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from PIL import Image
from safetensors.numpy import load_file, save_file
from transformers import (
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from tests import hf_fixtures
from unime_jax.demo import model as demo
from unime_jax.export import hf as export
from unime_jax.export.hf import ExportError, export_hf
from unime_jax.export.peft import export_peft_adapter
from unime_jax.families.llava import NEXT
from unime_jax.inference import EmbeddingModel, load_pretrained
from unime_jax.models.lora import apply_lora, merge_lora
from unime_jax.weights.safetensors import INDEX_FILE, SINGLE_FILE, CheckpointReader

LLM_TARGETS = NEXT.lora_targets["llm"]
VISION_ATTENTION_TARGETS = NEXT.lora_targets["vision_attention"]
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "image_newline")
HF_CLASSES = {
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}


def hf_load(path):
    """The exported model in transformers, asserting that every weight matched exactly."""
    family = json.loads((path / "config.json").read_text())["model_type"]
    model, info = HF_CLASSES[family].from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    return model.eval()


def randomize_b(module, seed=1):
    """B starts at zero (adapter = identity); give every B its own values."""
    for i, (_, var) in enumerate(nnx.iter_graph(module)):
        if isinstance(var, nnx.LoRAParam) and not np.any(np.asarray(var[...])):
            var.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), var.shape))


def flat(module) -> dict[str, np.ndarray]:
    state = module.state if isinstance(module, EmbeddingModel) else nnx.state(module)
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in state.flat_state()}


def tensors(directory) -> dict[str, np.ndarray]:
    reader = CheckpointReader(directory)
    return {name: np.asarray(reader.get(name)) for name in reader}


def on_mesh(module, like: EmbeddingModel) -> EmbeddingModel:
    """``module`` as a runnable model, sharded like ``like``."""
    return EmbeddingModel.from_module(module, like.family, like.processor, like.mesh)


def batches(processor, with_image: bool = True) -> list[dict]:
    """A text batch and a batch mixing a text row with an image row."""
    texts = ["a red circle left of a blue square", "two dogs on the grass"]
    out = [processor([processor.text_prompt(t) for t in texts])]
    if with_image:
        pixels = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
        prompts = [processor.text_prompt(texts[0]), processor.image_prompt()]
        out.append(processor(prompts, [None, Image.fromarray(pixels)]))
    return out


def assert_parity(ours: EmbeddingModel, hf_model, processor, with_image=True) -> None:
    for batch in batches(processor, with_image):
        mask = batch["attention_mask"].astype(bool)
        ref = hf_fixtures.hf_hidden_states(hf_model, **batch)
        np.testing.assert_allclose(ours(**batch)[mask], ref[mask], atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def base(request, tmp_path_factory):
    return hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp(request.param), request.param, seed=3
    )


@pytest.fixture(scope="module")
def onevision(tmp_path_factory):
    return hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("ov"), "llava_onevision", seed=5)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    """CLIP at feature layer -2: the last vision layer is not part of our model."""
    return hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("next"), "llava_next", seed=6)


@pytest.fixture(scope="module")
def demo_model():
    """The offline demo model: built in code, no checkpoint."""
    hf_config, processor = demo.build()
    return demo.FAMILY.build(processor.config, rngs=nnx.Rngs(0)), hf_config, processor


def test_merged_export_loads_in_transformers_and_reloads_exactly(base, tmp_path):
    loaded = load_pretrained(base)
    module = loaded.module
    apply_lora(module, LLM_TARGETS + VISION_ATTENTION_TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(1))
    randomize_b(module)
    merged = nnx.clone(module)
    merge_lora(merged)
    sharded = "next" in base.name  # also the sharded layout with an index
    out = export_hf(
        module, tmp_path / "hf", base_dir=base, max_shard_size="40KB" if sharded else "50GB"
    )
    assert module.llm.layers.attn.q_proj.lora_a is not None  # the caller's model is untouched
    assert (out / INDEX_FILE).is_file() == sharded and (out / SINGLE_FILE).is_file() != sharded
    assert not out.with_name("hf.tmp").exists()
    # The names and shapes transformers' own save_pretrained writes, config and tokenizer copied.
    written, reference = tensors(out), tensors(base)
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in reference.items()}
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (base / "config.json").read_text()
    )
    for file in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (out / file).read_bytes() == (base / file).read_bytes()

    processor = loaded.processor
    assert_parity(on_mesh(merged, loaded), hf_load(out), processor)
    reloaded = flat(load_pretrained(out))
    expected = flat(merged)
    assert reloaded.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)


def test_text_only_model_takes_vision_tower_from_base(tmp_path, tmp_path_factory):
    """Stage 1's hand-over: the base (hub naming) gives vision tower, projector, LM head."""
    base = hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp("hub"), "llava_next", seed=4, hub_layout=True
    )
    loaded = load_pretrained(base, text_only=True)
    module = loaded.module
    apply_lora(module, LLM_TARGETS, rank=4, alpha=16, rngs=nnx.Rngs(2))
    randomize_b(module)
    merged = nnx.clone(module)
    merge_lora(merged)
    out = export_hf(module, tmp_path / "merged", base_dir=base)

    written, original = tensors(out), tensors(base)
    canonical_name = NEXT.weight_map(loaded.config).canonical
    by_canonical = {canonical_name(k): v for k, v in original.items()}
    assert {canonical_name(k) for k in written} == set(by_canonical)
    assert not any(k.startswith("vision_tower.vision_model.") for k in written)
    copied = [k for k in written if canonical_name(k).startswith((*VISION_PREFIXES, "lm_head"))]
    assert len(copied) > 20
    for key in copied:
        source = by_canonical[canonical_name(key)]
        assert written[key].dtype == source.dtype and written[key].tobytes() == source.tobytes()

    reloaded = flat(load_pretrained(out, text_only=True))
    for key, value in flat(merged).items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)
    full, base_full = flat(load_pretrained(out)), flat(load_pretrained(base))
    assert all(np.array_equal(full[k], v) for k, v in base_full.items() if not k.startswith("llm"))
    processor = loaded.processor
    assert_parity(on_mesh(merged, loaded), hf_load(out), processor, with_image=False)


@pytest.mark.parametrize("case", ["demo", "next_bf16"])
def test_export_without_base(case, demo_model, llava_next, tmp_path):
    """From hf_config + processor alone; the LLaVA-NeXT model is one loaded from a checkpoint
    (fast to build) exported without it, in bf16 and sharded."""
    if case == "demo":
        model, hf_config, processor = demo_model
        config = model.cfg
    else:
        model = load_pretrained(llava_next)  # an EmbeddingModel is exported like its module
        config, hf_config = model.config, json.loads((llava_next / "config.json").read_text())
        processor = model.processor
    dtype = "bfloat16" if case == "next_bf16" else None
    out = export_hf(
        model,
        tmp_path / case,
        hf_config=hf_config,
        processor=processor,
        dtype=dtype,
        max_shard_size="30KB" if dtype else "50GB",
    )

    assert (out / INDEX_FILE).is_file() == bool(dtype)
    hf_model = hf_load(out)  # complete: LM head, vision post-layernorm, unused CLIP layer
    loaded = load_pretrained(out)
    assert loaded.config == config
    reloaded = flat(loaded)
    for key, value in flat(model).items():
        cast = value.astype(np.dtype(jax.numpy.dtype(dtype or value.dtype))).astype(np.float32)
        np.testing.assert_array_equal(reloaded[key], cast, err_msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == (dtype or "float32")
    assert config["architectures"] == [type(hf_model).__name__]
    if dtype:
        assert {v.dtype.name for v in tensors(out).values()} == {"bfloat16"}

    reread = loaded.processor
    for ours, theirs in zip(batches(processor), batches(reread)):
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert_parity(loaded, hf_model, reread)


def test_peft_adapter_reproduces_our_lora_model(llava_next, tmp_path):
    base = llava_next
    loaded = load_pretrained(base)
    module = loaded.module
    apply_lora(module, LLM_TARGETS, rank=4, alpha=8, dropout=0.1, rngs=nnx.Rngs(3))
    apply_lora(module, VISION_ATTENTION_TARGETS, rank=2, alpha=6, rngs=nnx.Rngs(4))
    randomize_b(module)
    out = export_peft_adapter(module, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 4
    assert set(config["alpha_pattern"].values()) == {6}

    hf_model = hf_fixtures.load_hf_model(base)
    peft_model = PeftModel.from_pretrained(hf_model, out).eval()
    adapted = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert len(adapted) == 2 * 7 + 2 * 4  # the third CLIP layer is not part of our model
    assert not any(".encoder.layers.2." in n for n in adapted)
    lora_b = [m.lora_B["default"].weight for n, m in peft_model.named_modules() if n in adapted]
    assert all(bool(torch.any(w != 0)) for w in lora_b)  # every adapter was loaded
    processor = loaded.processor
    assert_parity(on_mesh(module, loaded), hf_model, processor)


def test_errors_and_atomic_writes(onevision, demo_model, tmp_path, monkeypatch):
    module, hf_config, processor = demo_model
    with pytest.raises(ExportError, match=r"both hf_config .* and processor are required"):
        export_hf(module, tmp_path / "a", processor=processor)
    text_only = demo.FAMILY.build(module.cfg.text_only(), rngs=nnx.Rngs(0))
    with pytest.raises(ExportError, match=r"(?s)text-only model .* pass base_dir"):
        export_hf(text_only, tmp_path / "a", hf_config=hf_config, processor=processor)
    with pytest.raises(ExportError, match=r"describes another model.*text\.hidden_size"):
        export_hf(module, tmp_path / "a", base_dir=onevision)
    with pytest.raises(ExportError, match="dtype 'float64' is not supported"):
        export_hf(module, tmp_path / "a", hf_config=hf_config, processor=processor, dtype="float64")
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.tmp").exists()

    # A non-empty directory is replaced only on request.
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(ExportError, match=r"(?s)is not empty.*pass overwrite=True"):
        export_hf(module, out, hf_config=hf_config, processor=processor)
    export_hf(module, out, hf_config=hf_config, processor=processor, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()

    # An export that dies half-way leaves neither a directory nor its temporary.
    calls = []

    def failing_gather(x):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("simulated crash")
        return np.asarray(jax.device_get(x))

    monkeypatch.setattr(export, "gather", failing_gather)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_hf(module, tmp_path / "crash", hf_config=hf_config, processor=processor)
    assert not (tmp_path / "crash").exists() and not (tmp_path / "crash.tmp").exists()
    monkeypatch.undo()

    # A base whose tensors do not fit the model, and a base that is the output.
    loaded = load_pretrained(onevision)
    broken = shutil.copytree(onevision, tmp_path / "broken")
    weights = load_file(broken / SINGLE_FILE)
    weights["multi_modal_projector.linear_2.bias"] = np.zeros(65, np.float32)
    save_file(weights, broken / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"(?s)'multi_modal_projector.linear_2.bias' .* \(65,\)"):
        export_hf(loaded, tmp_path / "b", base_dir=broken)
    with pytest.raises(ExportError, match=r"(?s)out_dir .* is base_dir"):
        export_hf(loaded, onevision, base_dir=onevision, overwrite=True)
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_peft_adapter(loaded, tmp_path / "p", base_model_name_or_path="x")
