"""Qwen2-VL and Qwen2.5-VL against transformers 5.23 on tiny random checkpoints (fp32).

Unusual sizes (patch 6, ViT width 48 with head_dim 12, LLM width 80 with mrope_section [2,4,4]
and rope theta 100, Qwen2.5-VL windows of 2x2 merged units with full attention in layers 1 and 3,
Qwen2-VL with tied embeddings), real photos squeezed to extreme aspect ratios. Parity: final
hidden states at real tokens max |diff| <= 1e-4, pooled embeddings cos >= 0.99999, for text-only,
image, mixed and multi-image batches, both padding sides, both position modes. The older mode is
checked against transformers fed the position ids a port of transformers 4.4x's
``get_rope_index`` computes (``qwen_fixtures.legacy_position_ids``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

from configs import stage1, stage2
from tests import qwen_fixtures as qf
from tests.test_export import flat, on_mesh, randomize_b
from tests.test_model_parity import photo
from unime_jax import families
from unime_jax.data.pairs import PairTransform
from unime_jax.embedder import Embedder
from unime_jax.export.hf import export_hf
from unime_jax.export.peft import export_peft_adapter
from unime_jax.families import qwen2_vl
from unime_jax.families.qwen2_vl_processor import mrope_positions
from unime_jax.inference import load_pretrained
from unime_jax.models.lora import apply_lora, merge_lora

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_vl", "qwen2_5_vl")
WIDE, TALL = ("coffee", (300, 40)), ("astronaut", (30, 260))  # 2x21 and 22x2 merged windows
# Batches share one shape (256 tokens; at most 64 merge windows per row, so 64-unit pools): the
# model compiles once per family instead of once per test.
LENGTH = 256


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    family = request.param
    path = qf.save_tiny_qwen(
        tmp_path_factory.mktemp(family), family, seed=7, tie=family == "qwen2_vl"
    )
    return family, path, load_pretrained(path), qf.load_hf_model(path)


def assert_parity(model, hf_model, batch, position_ids=None, pooled=True) -> tuple[float, float]:
    """(max |diff| of hidden states at real tokens, min cosine of ``model.embed``'s pooled
    embeddings; 1.0 when not ``pooled``)."""
    ours = model(**batch)
    ref = qf.hf_hidden_states(hf_model, **batch, position_ids=position_ids)
    mask = batch["attention_mask"].astype(bool)
    diff = float(np.abs(ours[mask] - ref[mask]).max())
    assert diff <= 1e-4, diff
    if not pooled:
        return diff, 1.0
    pooled = model.embed(**batch)
    last = np.array([np.flatnonzero(m)[-1] for m in mask])
    ref_pooled = ref[np.arange(len(last)), last]
    ref_pooled /= np.linalg.norm(ref_pooled, axis=-1, keepdims=True)
    cos = float(np.sum(pooled * ref_pooled, axis=-1).min())
    assert cos >= 0.99999, cos
    return diff, cos


def embed_examples(model, examples) -> np.ndarray:
    """``model.embed_examples`` at the shared batch shape."""
    return model.run(model.batch(examples, length=LENGTH), pool=True, rows=len(examples))


def reference_processor(path):
    return qf.ReferenceProcessor(
        Qwen2VLImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    )


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_processor_is_transformers_processor(case, padding_side):
    """input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw: bit for bit."""
    _, path, model, _ = case
    p = model.processor
    prompts = [p.text_prompt("a cat"), p.image_prompt(), "<|image_pad|> and <|image_pad|>"]
    images = [None, photo(*WIDE), [photo("rocket", (50, 70)), photo(*TALL)]]
    ours = p(prompts, images, padding_side=padding_side)
    theirs = reference_processor(path)(
        text=prompts,
        images=[images[1], *images[2]],
        padding="max_length",
        max_length=ours["input_ids"].shape[1],
        padding_side=padding_side,
        return_tensors="np",
    )
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
        assert value.dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_text_only(case, padding_side):
    _, _, model, hf_model = case
    p = model.processor
    texts = ["a dog sitting on the grass", "a red circle left of a blue square above the table"]
    batch = p([p.text_prompt(t) for t in texts], max_length=LENGTH, padding_side=padding_side)
    assert_parity(model, hf_model, batch)


def test_photos_of_extreme_aspect_ratios(case):
    _, _, model, hf_model = case
    p = model.processor
    batch = p([p.image_prompt()] * 2, [photo(*WIDE), photo(*TALL)], max_length=LENGTH)
    assert batch["image_grid_thw"].tolist() == [[1, 4, 42], [1, 44, 4]]
    assert_parity(model, hf_model, batch)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_and_multi_image_batches(case, padding_side):
    """[text, image, text, image], and a row with two images (bare and wrapped) after a text row."""
    _, _, model, hf_model = case
    p = model.processor
    text, image = p.text_prompt, p.image_prompt()
    mixed = p(
        [text("a cat"), image, text("a red circle left of a blue square"), image],
        [None, photo("coffee", (120, 60)), None, photo(*TALL)],
        max_length=LENGTH,
        padding_side=padding_side,
    )
    assert len(mixed["image_grid_thw"]) == 2
    assert_parity(model, hf_model, mixed)
    two = "<|vision_start|><|image_pad|><|vision_end|> and <|image_pad|> look alike"
    multi = p(
        [text("a cat"), two, image],
        [None, [photo(*WIDE), photo("rocket", (40, 70))], photo("chelsea", (50, 50))],
        max_length=LENGTH,
        padding_side=padding_side,
    )
    assert len(multi["image_grid_thw"]) == 3
    assert_parity(model, hf_model, multi)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_vision_start_position_mode(case, padding_side):
    """The older numbering (VLM2Vec-Qwen2VL, UniME-V2) on MMEB-style bare prompts and a chat
    prompt, against transformers fed the older get_rope_index's position ids."""
    _, _, model, hf_model = case
    p = model.processor
    prompts = [
        p.image_prompt(),  # <|vision_start|><|image_pad|>: M-RoPE in both modes
        p.instruction("<|image_1|> Represent the given image for classification"),
        p.instruction("Find a photo of a dog"),
        p.instruction("<|image_1|> and <|image_1|> look alike"),
    ]
    images = [
        photo("chelsea", (50, 50)),
        photo(*WIDE),
        None,
        [photo(*TALL), photo("rocket", (40, 70))],
    ]
    batch = p(prompts, images, max_length=LENGTH, padding_side=padding_side)
    cfg = model.config
    legacy = qf.legacy_position_ids(
        batch["input_ids"],
        batch["attention_mask"],
        batch["image_grid_thw"],
        cfg.image_token_id,
        cfg.vision_start_token_id,
    )
    p.position_mode = "vision_start"
    try:
        assert_parity(model, hf_model, batch, position_ids=legacy)
        old = embed_examples(model, p.encode_batch(prompts, images))
    finally:
        p.position_mode = "transformers"
    examples = p.encode_batch(prompts, images)
    # What the ahead-of-time check declares for this family (aot.abstract_batch).
    assert {e.positions.shape[1:] for e in examples} == {qwen2_vl.QwenVLFamily.position_axes}
    new = embed_examples(model, examples)
    same = np.sum(old * new, axis=-1) > 1 - 1e-6
    assert same.tolist() == [True, False, True, False]  # the modes differ on bare images only


def test_positions():
    """transformers 5.x numbering: text counts on, an image takes (p, p+row, p+col), then
    p += max(rows, cols)."""
    pos = mrope_positions(8, [(2, 2, 3)])
    expected = [[0] * 3, [1] * 3, [2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4]]
    np.testing.assert_array_equal(pos[:8], np.array(expected))
    np.testing.assert_array_equal(mrope_positions(9, [(2, 2, 3)])[8], [5, 5, 5])


def test_encoded_batches_equal_processor_batches(case):
    """Fast path (uint8 merge windows, normalised on device) == HF-format path (float
    pixel_values per patch) as far as the model can tell."""
    _, _, model, _ = case
    p = model.processor
    prompts = [p.image_prompt(), p.text_prompt("a dog"), "<|image_pad|> or <|image_pad|>"]
    images = [photo("coffee", (70, 30)), None, [photo(*TALL), photo("astronaut", (50, 50))]]
    via_hf = model.embed(**p(prompts, images, max_length=LENGTH, padding_side="left"))
    fast = model.embed_examples(p.encode_batch(prompts, images))
    np.testing.assert_allclose(fast, via_hf, atol=2e-6)


def test_tensor_name_layouts_and_flat_config(case, tmp_path):
    """Hub/save_pretrained names (model.layers, visual) and 5.x module names
    (model.language_model, model.visual), with the hub's flat config.json, load the same model;
    text-only loading skips the vision tower."""
    _, path, model, _ = case
    other = tmp_path / "module_names"
    shutil.copytree(path, other)
    qf.rename_to_module_names(other)
    qf.flatten_config(other)
    loaded = load_pretrained(other)
    assert loaded.config == model.config
    ours, theirs = flat(model), flat(loaded)
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
    text_only = load_pretrained(other, text_only=True)
    assert text_only.config.vision is None and text_only.module.vision is None


def test_merged_export_loads_in_transformers(case, tmp_path):
    """LoRA on LLM and vision attention, merged into an HF checkpoint: with base_dir (Qwen2.5-VL)
    or from hf_config + processor alone (Qwen2-VL, tied embeddings: no lm_head written)."""
    family, path, model, _ = case
    module = model.module
    targets = [
        *qwen2_vl.QWEN2_VL.lora_targets["llm"],
        *qwen2_vl.QWEN2_VL.lora_targets["vision_attention"],
    ]
    apply_lora(module, targets, rank=4, alpha=8, rngs=nnx.Rngs(1))
    randomize_b(module)
    merged = nnx.clone(module)
    merge_lora(merged)
    if family == "qwen2_5_vl":
        out = export_hf(module, tmp_path / "hf", base_dir=path)
    else:
        hf_config = json.loads((path / "config.json").read_text())
        out = export_hf(module, tmp_path / "hf", hf_config=hf_config, processor=model.processor)
    model_cls = qf.CLASSES[family][1]
    hf_model, info = model_cls.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not {k: v for k, v in info.items() if v}, info
    p = model.processor
    batch = p([p.text_prompt("a cat"), p.image_prompt()], [None, photo(*WIDE)], max_length=LENGTH)
    assert_parity(on_mesh(merged, model), hf_model.eval(), batch, pooled=False)
    reloaded = flat(load_pretrained(out))
    for key, value in flat(merged).items():
        np.testing.assert_array_equal(reloaded[key], value, err_msg=key)


def test_peft_adapter_reproduces_our_lora_model(case, tmp_path):
    _, path, model, _ = case
    module = model.module
    lora = qwen2_vl.QWEN2_5_VL.lora_targets
    apply_lora(module, lora["llm"], rank=4, alpha=8, rngs=nnx.Rngs(3))
    apply_lora(module, lora["vision_attention"], rank=2, alpha=6, rngs=nnx.Rngs(4))
    randomize_b(module)
    out = export_peft_adapter(module, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(qf.load_hf_model(path), out).eval()
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    depth = module.cfg.vision.num_layers
    assert len(adapted) == 2 * 7 + 2 * depth
    assert sum(".visual.blocks." in n and n.endswith(".attn.qkv") for n in adapted) == depth
    p = model.processor
    batch = p([p.text_prompt("a cat"), p.image_prompt()], [None, photo(*TALL)], max_length=LENGTH)
    assert_parity(on_mesh(module, model), peft_model, batch, pooled=False)


def test_embedder_and_training_rows(case):
    """Embedder.embed_images / texts / instructions equal transformers; an MMEB row becomes a
    stage-2 example with the family's image token expanded."""
    _, _, model, hf_model = case
    p = model.processor
    embedder = Embedder(model, batch_size=8, progress=False)
    images = [photo(*WIDE), photo("chelsea", (40, 90))]
    texts = ["a cat on a mat", "two dogs"]
    got = {
        "images": (embedder.embed_images(images), [p.image_prompt()] * 2, images),
        "texts": (embedder.embed_texts(texts), [p.text_prompt(t) for t in texts], [None, None]),
    }
    instructions = ["<|image_1|> Represent the given image", "Find a dog"]
    got["instructions"] = (
        embedder.embed_instructions(instructions, [images[0], None]),
        [p.instruction(t) for t in instructions],
        [images[0], None],
    )
    assert got["instructions"][1][0] == "<|image_pad|> Represent the given image"
    for what, (ours, prompts, row_images) in got.items():
        batch = p(prompts, row_images)
        ref = qf.hf_hidden_states(hf_model, **batch)
        last = batch["attention_mask"].sum(1) - 1
        ref = ref[np.arange(len(prompts)), last]
        ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
        assert np.sum(ours * ref, axis=-1).min() >= 0.99999, what
    units = p.max_units(336)
    transform = PairTransform(
        p, lengths={"query": 512, "target": 64}, max_units=units, image_size=336
    )
    row = transform.map({"qry": "<|image_1|> What is this?", "qry_image_path": images[1],
                         "pos_text": "a cat", "pos_image_path": ""})  # fmt: skip
    query = row["query"]
    assert query.num_units == units  # the 336 px square, within the processor's max_pixels
    assert int(np.sum(query.input_ids == model.config.image_token_id)) == units
    assert query.positions.shape == (len(query), 3)


def test_position_mode_from_config(case, tmp_path):
    """config.json's "unime_position_mode" sets the processor's mode."""
    _, path, _, _ = case
    other = tmp_path / "legacy"
    shutil.copytree(path, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"unime_position_mode": "vision_start"}))
    assert load_pretrained(other).processor.position_mode == "vision_start"
    bad = config | {"unime_position_mode": "old"}
    family = qwen2_vl.QWEN2_VL if config["model_type"] == "qwen2_vl" else qwen2_vl.QWEN2_5_VL
    with pytest.raises(ValueError, match="position_mode 'old'"):
        family.processor(family.parse_config(bad), bad, AutoTokenizer.from_pretrained(path))


def test_compiles_once_per_shape(case):
    _, _, model, _ = case
    p = model.processor
    a = p([p.image_prompt()] * 2, [photo(*WIDE), photo(*TALL)], max_length=LENGTH)
    model.embed(**a)
    traces = model.trace_count
    b = p([p.image_prompt()] * 2, [photo("coffee", (120, 60)), photo("rocket")], max_length=LENGTH)
    model.embed(**b)
    assert model.trace_count == traces


@pytest.mark.parametrize(
    "preset, width, tied, window",
    [
        ("qwen2_vl_2b", 1536, True, 0),
        ("qwen2_vl_7b", 3584, False, 0),
        ("qwen2_5_vl_7b", 3584, False, 4),
    ],
)
def test_bundled_configs_and_presets(preset, width, tied, window):
    """The presets name bundled hub configs (flat layout, defaults omitted) that parse into the
    published architectures; a 336 px image is 144 merge windows."""
    for module in (stage1, stage2):
        assert module.get_config(preset).reference_model == stage2.QWEN_VL[preset]
    hf = json.loads((REPO / "configs/models" / f"{stage2.QWEN_VL[preset]}.json").read_text())
    family = families.for_config(hf)
    cfg = family.parse_config(hf)
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.head_dim) == (width, 28, 128)
    assert cfg.text.rope.mrope_section == (16, 24, 24) and cfg.text.qkv_bias
    v = cfg.vision
    assert (v.hidden_size, v.num_layers, v.patch_dim, v.out_size, v.window) == (
        1280, 32, 1176, width, window
    )  # fmt: skip
    assert bool(hf["tie_word_embeddings"]) == tied
    shapes = family.image_shapes(cfg, hf, 336)
    assert (shapes.units, shapes.tokens, shapes.taps) == (144, 144, 1)
    assert family.image_shapes(cfg, hf, 0).units == 1280
    assert family.forward_flops(cfg, 2, 512, 288) > family.forward_flops(cfg, 2, 512, 0) > 0
