"""Phi-3-V / Phi-3.5-V: HD transform, processor, parity with a transformers reference (native
Phi3Model with LongRoPE + CLIPVisionModel, see ``tests/phi3_v_fixtures.py``), hub-layout loading,
export, PEFT, Embedder and evaluation.

Two tiny checkpoints: 336 px crops (the real geometry: 24x24 CLIP patches, 144 merged features per
crop) for the parity cases, and 56 px crops (2x2 merged features) where only the plumbing matters.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from PIL import Image
from safetensors.numpy import load_file, save_file

from configs import stage1, stage2
from tests import phi3_v_fixtures as fx
from tests.test_export import flat, on_mesh, randomize_b, tensors
from tests.test_model_parity import photo
from unime_jax import embed as embed_cli
from unime_jax import families, sharding
from unime_jax.embedder import Embedder
from unime_jax.eval.evaluators import evaluate_mmeb
from unime_jax.eval.mmeb_eval import MmebRow
from unime_jax.export.hf import export_hf
from unime_jax.export.peft import export_peft_adapter
from unime_jax.families.phi3_v import PHI3_V
from unime_jax.inference import load_pretrained
from unime_jax.models.config import ConfigError
from unime_jax.models.lora import apply_lora, merge_lora
from unime_jax.preprocess import hd_crops
from unime_jax.weights.safetensors import SINGLE_FILE, CheckpointError

# (width, height): square, portrait, landscape, extreme; grids (h_c, w_c) at 4 and 16 crops.
SIZES = {
    "square": ((300, 300), {4: (2, 2), 16: (4, 4)}),
    "portrait": ((150, 330), {4: (2, 1), 16: (5, 3)}),
    "landscape": ((400, 180), {4: (1, 2), 16: (3, 5)}),
    "extreme": ((600, 60), {4: (1, 4), 16: (1, 10)}),
}
ORIGINAL_MAX = 600  # LongRoPE switch of the 336 px checkpoint: image rows of both kinds
REPO = Path(__file__).resolve().parents[1]
LLM = PHI3_V.lora_targets["llm"]
VISION = PHI3_V.lora_targets["vision_attention"]


def image(kind: str) -> Image.Image:
    return photo("astronaut", SIZES[kind][0])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """336 px crops, loaded on a (fsdp 2, tensor 4) mesh: two image groups, sharded heads."""
    path = fx.save_tiny_phi3_v(tmp_path_factory.mktemp("phi336"), seed=1, original_max=ORIGINAL_MAX)
    model = load_pretrained(path, mesh=sharding.make_mesh({"fsdp": 2, "tensor": 4}))
    return path, model, fx.load_reference(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """56 px crops (2x2 merged features a crop), glb_sub order, on the default 8-device mesh."""
    path = fx.save_tiny_phi3_v(
        tmp_path_factory.mktemp("phi56"), seed=2, crop=56, order="glb_sub", original_max=40
    )
    return path, load_pretrained(path), fx.load_reference(path)


def compare(model, reference, batch, label, rows=None):
    """Hidden states (non-pad positions) within 1e-4 and pooled embeddings at cos >= 0.99999 of
    the per-row reference; prints the worst max |dh| and min cos (per named row with ``rows``)."""
    ours = model(**batch)
    ref = fx.reference_hidden_states(reference, **batch)
    mask = batch["attention_mask"].astype(bool)
    last = np.array([np.flatnonzero(m)[-1] for m in mask])
    ref_pooled = ref[np.arange(len(last)), last]
    ref_pooled /= np.linalg.norm(ref_pooled, axis=-1, keepdims=True)
    cos = np.sum(model.embed(**batch) * ref_pooled, axis=-1)
    delta = np.array([np.abs(o[m] - r[m]).max() for o, r, m in zip(ours, ref, mask)])
    for name, i in (rows or {label: slice(None)}).items():
        print(f"\n{name}: max |dh| {delta[i].max():.2e}, min cos {cos[i].min():.7f}")
    assert delta.max() <= 1e-4 and cos.min() >= 0.99999, (label, delta, cos)


# ---- host side: HD transform, bicubic, processor --------------------------------------------
@pytest.mark.parametrize("num_crops", [4, 16])
def test_token_counts_follow_the_reference_formula(big, num_crops):
    _, model, _ = big
    processor = PHI3_V.processor(
        model.config, {}, model.processor.tokenizer, hd_crops.HDImageProcessor(num_crops=num_crops)
    )
    for kind, (_, grids) in SIZES.items():
        h, w = grids[num_crops]
        expected = (h * w + 1) * 144 + 1 + (h + 1) * 12
        batch = processor([processor.image_prompt()], [image(kind)])
        assert (batch["input_ids"] < 0).sum() == expected, kind
        assert batch["image_sizes"].tolist() == [[336 * h, 336 * w]], kind
        assert batch["pixel_values"].shape == (1, num_crops + 1, 3, 336, 336)
        assert processor.max_units() == num_crops + 1
    assert hd_crops.num_image_tokens(hd_crops.hd_size(512, 512, 4)) == 757
    with pytest.raises(ValueError, match="too thin"):
        hd_crops.hd_size(3000, 2, 4)


def test_bicubic_equals_torch_interpolate():
    rng = np.random.default_rng(0)
    shapes = [(672, 672), (1344, 336), (336, 1008), (1344, 1344)]  # the global views
    shapes += [tuple(rng.integers(3, 300, 2)) for _ in range(8)]  # any up/down scale
    for h, w in shapes:
        out_h, out_w = (336, 336) if h >= 336 else tuple(rng.integers(3, 300, 2))
        x = (2 * rng.standard_normal((3, h, w))).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None], size=(int(out_h), int(out_w)), mode="bicubic"
        )
        np.testing.assert_array_equal(hd_crops.bicubic_resize(x, out_h, out_w), ref[0].numpy())


def test_pixels_equal_the_reference_processor(big):
    _, model, _ = big
    processor = model.processor
    images = [image(kind) for kind in SIZES]
    batch = processor([processor.image_prompt()] * len(images), images)
    for k, im in enumerate(images):
        pixels, size = fx.reference_pixels(im, num_crops=4)
        assert tuple(batch["image_sizes"][k]) == size
        np.testing.assert_array_equal(batch["pixel_values"][k, : len(pixels)], pixels)
        assert not batch["pixel_values"][k, len(pixels) :].any()  # zero-padded crops


def test_prompts_and_per_chunk_tokenisation(big):
    _, model, _ = big
    p = model.processor
    assert p.image_prompt() == (
        "<|user|>\n<|image_1|>\nSummary above image in one word:<|end|>\n<|assistant|>\n"
    )
    assert p.text_prompt("a cat") == (
        "<|user|>\na cat\nSummary above sentence in one word:<|end|>\n<|assistant|>\n"
    )
    assert p.instruction("<|image_1|> Represent the image") == "<|image_1|> Represent the image"
    ids = p.encode("a <|image_1|> b <|image_2|>", [image("square"), image("landscape")]).input_ids
    bos = p.tokenizer.bos_token_id
    runs = np.flatnonzero(np.diff(np.concatenate([[0], ids < 0, [0]]).astype(int)))
    assert ids[0] == bos and (ids == bos).sum() == 3  # every chunk tokenised on its own
    assert set(ids[runs[0] : runs[1]]) == {-1} and set(ids[runs[2] : runs[3]]) == {-2}
    with pytest.raises(ValueError, match=r"the prompt has 1 image token\(s\) but 0 image"):
        p.encode(p.image_prompt())


# ---- parity with the transformers reference -------------------------------------------------
def test_text_only_matches_transformers(big):
    _, model, reference = big
    p = model.processor
    texts = ["a dog sitting on the grass", "a red circle left of a blue square above the table"]
    for side in ("right", "left"):
        batch = p([p.text_prompt(t) for t in texts], padding_side=side)
        compare(model, reference, batch, f"text only, {side} padding")
        # Short rows: transformers' own padded batch forward agrees as well.
        mask = batch["attention_mask"].astype(bool)
        batched = fx.batched_hidden_states(reference, batch["input_ids"], batch["attention_mask"])
        np.testing.assert_allclose(model(**batch)[mask], batched[mask], atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_images_of_every_orientation_and_both_rope_branches(big, padding_side):
    """[text, square, text, portrait, landscape, extreme]: text rows anywhere, every orientation,
    rows on both sides of original_max_position_embeddings in one batch."""
    _, model, reference = big
    p = model.processor
    kinds = [None, "square", None, "portrait", "landscape", "extreme"]
    prompts = [p.text_prompt("a cat") if k is None else p.image_prompt() for k in kinds]
    batch = p(prompts, [None if k is None else image(k) for k in kinds], padding_side=padding_side)
    lengths = batch["attention_mask"].sum(1)
    assert (lengths > ORIGINAL_MAX).sum() == 2 and (lengths <= ORIGINAL_MAX).sum() == 4
    names = {
        f"{k or 'text'} ({'long' if n > ORIGINAL_MAX else 'short'} rope), {padding_side} padding": i
        for i, (k, n) in enumerate(zip(kinds, lengths))
    }
    compare(model, reference, batch, "mixed batch", rows=names)


def test_encoded_batches_equal_processor_batches(small):
    """``embed(**processor_outputs)`` equals ``embed_examples(encode_batch(...))``."""
    _, model, _ = small
    p = model.processor
    prompts = [p.image_prompt(), p.text_prompt("a dog"), p.image_prompt(), p.image_prompt()]
    images = [image("portrait"), None, image("extreme"), image("square")]
    via_hf = model.embed(**p(prompts, images, padding_side="left"))
    fast = model.embed_examples(p.encode_batch(prompts, images))
    np.testing.assert_allclose(fast, via_hf, atol=2e-6)


# ---- weights: hub layout, strictness, export, PEFT ------------------------------------------
def test_hub_layout_loads_strictly(small, tmp_path):
    path, _, _ = small
    names = set(load_file(path / SINGLE_FILE))
    assert (
        "model.vision_embed_tokens.img_processor.vision_model.encoder.layers.0.mlp.fc1.weight"
        in names
    )
    assert {"model.vision_embed_tokens.sub_GN", "lm_head.weight"} <= names
    broken = shutil.copytree(path, tmp_path / "extra")
    weights = load_file(broken / SINGLE_FILE)
    weights["model.vision_embed_tokens.extra_GN"] = np.zeros(4, np.float32)
    weights["model.vision_embed_tokens.wte.weight"] = weights["model.embed_tokens.weight"]
    save_file(weights, broken / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*extra_GN"):
        load_pretrained(broken)
    del (
        weights["model.vision_embed_tokens.extra_GN"],
        weights["model.layers.1.mlp.gate_up_proj.weight"],
    )
    save_file(weights, broken / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"llm/layers/mlp/gate_up_proj/kernel\[layer 1\]"):
        load_pretrained(broken)


def test_export_with_and_without_base_reloads_exactly(small, tmp_path):
    path, loaded, _ = small
    module = loaded.module
    apply_lora(module, LLM + VISION, rank=4, alpha=8, rngs=nnx.Rngs(1))
    randomize_b(module)
    merged = nnx.clone(module)
    merge_lora(merged)
    out = export_hf(module, tmp_path / "hf", base_dir=path)
    written, base = tensors(out), tensors(path)
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in base.items()}
    base_config = json.loads((path / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == base_config | {"dtype": "float32"}
    reference = fx.load_reference(out)  # strict: the hub names and shapes, nothing missing
    compare(on_mesh(merged, loaded), reference, batches(loaded.processor), "export with base")
    expected = flat(merged)
    for key, value in flat(load_pretrained(out)).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)

    alone = export_hf(merged, tmp_path / "alone", hf_config=base_config, processor=loaded.processor)
    assert set(tensors(alone)) == set(base)  # LM head, CLIP post-layernorm and last layer filled
    config = json.loads((alone / "config.json").read_text())
    assert config["architectures"] == ["Phi3VForCausalLM"] and config["model_type"] == "phi3_v"
    reloaded = load_pretrained(alone)
    for key, value in flat(reloaded).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert reloaded.processor.image_processor == loaded.processor.image_processor
    compare(reloaded, fx.load_reference(alone), batches(loaded.processor), "export without base")


def batches(processor) -> dict:
    prompts = [processor.text_prompt("two dogs"), processor.image_prompt()]
    return processor(prompts, [None, image("landscape")])


def test_peft_adapter_reproduces_our_lora_model(small, tmp_path):
    path, loaded, _ = small
    module = loaded.module
    apply_lora(module, LLM, rank=4, alpha=8, rngs=nnx.Rngs(3))
    apply_lora(module, VISION, rank=2, alpha=6, rngs=nnx.Rngs(4))
    randomize_b(module)
    out = export_peft_adapter(module, tmp_path / "adapter", base_model_name_or_path=str(path))
    config = json.loads((out / "adapter_config.json").read_text())
    assert "qkv_proj" in config["target_modules"] and "gate_up_proj" in config["target_modules"]
    reference = fx.load_reference(path)
    peft_model = PeftModel.from_pretrained(reference, out).eval()
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 2 * 4 + 2 * 4  # 2 LLM layers x 4, 2 of 3 CLIP layers x 4
    assert not any(".encoder.layers.2." in n for n in adapted)
    compare(on_mesh(module, loaded), reference, batches(loaded.processor), "PEFT adapter")


# ---- the product: family, presets, Embedder, CLI, evaluation --------------------------------
def test_hub_config_implies_clip_vit_l_336_and_presets_name_it():
    hf = json.loads((REPO / "configs/models/Phi-3.5-vision-instruct.json").read_text())
    cfg = families.for_config(hf).parse_config(hf)
    assert (cfg.vision.hidden_size, cfg.vision.num_layers, cfg.vision_layers_used) == (1024, 24, 23)
    assert (cfg.text.num_layers, cfg.text.hidden_size, cfg.text.head_dim) == (32, 3072, 96)
    assert cfg.text.rope.original_max_positions == 4096 and len(cfg.text.rope.long_factor) == 48
    assert cfg.text.rope.attention_factor == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)
    assert cfg.text.sliding_window is None and cfg.hd_order == "sub_glb"
    shapes = PHI3_V.image_shapes(cfg, hf, 336)
    assert (shapes.units, shapes.tokens, shapes.taps) == (5, 757, 1)
    assert PHI3_V.forward_flops(cfg, 1, 1024, 5) > PHI3_V.forward_flops(cfg, 1, 1024, 0) > 0
    for module in (stage1, stage2):
        c = module.get_config("phi35v")
        assert c.reference_model == "Phi-3.5-vision-instruct"
    c = stage2.get_config("phi35v")
    assert (c.lr, c.batch_size, c.temperature, c.num_hard_negatives, c.margin) == (
        1e-4,
        1024,
        0.02,
        8,
        0.1,
    )
    bad = hf | {"embd_layer": hf["embd_layer"] | {"projection_cls": "linear"}}
    with pytest.raises(ConfigError, match="projection_cls"):
        PHI3_V.parse_config(bad)


def test_embedder_cli_and_mmeb(small, tmp_path, capsys):
    path, model, reference = small
    embedder = Embedder(model, batch_size=8, progress=False)
    images = [image("square"), image("portrait")]
    ours = embedder.embed_images(images)
    p = model.processor
    for i, im in enumerate(images):
        batch = p([p.image_prompt()], [im])
        last = batch["attention_mask"][0].sum() - 1  # right padding: the last real token
        ref = fx.reference_hidden_states(reference, **batch)[0, last]
        assert np.dot(ours[i], ref / np.linalg.norm(ref)) >= 0.99999
    texts = ["<|image_1|> Represent the given image", "Find a dog", "<|image_1|> and <|image_1|>"]
    mixed = embedder.embed_instructions(texts, [images[0], None, images])
    for i in range(3):  # MMEB's placeholder is Phi's own tag; each row as it would be alone
        alone = embedder.embed_instructions(texts[i : i + 1], [[images[0], None, images][i]])
        np.testing.assert_allclose(mixed[i], alone[0], atol=2e-6)
    picture = tmp_path / "astronaut.png"
    images[0].save(picture)
    rows = [
        MmebRow(
            "ImageNet-1K",
            0,
            "<|image_1|> Represent the image",
            str(picture),
            ("a", "b"),
            (None, None),
        )
    ]
    assert evaluate_mmeb(embedder, {"ImageNet-1K": rows})["num_rows"] == {"ImageNet-1K": 1}
    assert (
        embed_cli.main(
            ["--model", str(path), "--text", "a rocket", "--image", str(picture), "--json"]
        )
        == 0
    )
    assert np.array(json.loads(capsys.readouterr().out)["similarity"]).shape == (1, 1)


def test_text_only_model_for_stage_one(small):
    path, model, _ = small
    text = load_pretrained(path, text_only=True)
    assert text.module.vision is None
    p = text.processor
    batch = p([p.text_prompt("a red circle")])
    np.testing.assert_allclose(text.embed(**batch), model.embed(**batch), atol=1e-6)
    with pytest.raises(ValueError, match="text-only"):
        p([p.image_prompt()], [image("square")])
    paths = {path[0] for path, _ in nnx.state(text.module, nnx.Param).flat_state()}
    assert paths == {"llm"}  # no vision tower, projection or separators in memory
