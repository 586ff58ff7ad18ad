"""Parity with the transformers PyTorch models on tiny random checkpoints (fp32).

Each case builds a checkpoint with ``save_pretrained``, loads it with ``load_pretrained`` on the
8-device mesh and compares final hidden states (non-pad positions, max abs diff <= 1e-4) and
pooled embeddings (cosine >= 0.99999) on text only, one image, a batch of images whose AnyRes
tile counts differ, and left- vs right-padded batches.
"""

import numpy as np
import pytest
from PIL import Image

from tests import hf_fixtures
from unime_jax.embedder import Embedder
from unime_jax.inference import load_pretrained

CASES = {
    # SigLIP + Qwen2 (GQA 4/2, q/k/v bias, theta 1e6), OneVision layout with newline rows.
    "onevision_qwen2": dict(family="llava_onevision"),
    # Same, but anyres_max_1 so large images take OneVision's bilinear downsampling path.
    "onevision_downsample": dict(family="llava_onevision", vision_aspect_ratio="anyres_max_1"),
    # CLIP (feature layer -2, CLS dropped) + Mistral (GQA), LLaVA-NeXT layout.
    "next_mistral": dict(family="llava_next"),
    # CLIP + Llama without GQA, another rope theta and another pinpoint grid, hub-style names,
    # sharded checkpoint with an index file.
    "next_llama": dict(
        family="llava_next",
        text="llama",
        text_config={"num_key_value_heads": 4, "rope_theta": 5000.0},
        image_grid_pinpoints=[[32, 32], [32, 96], [96, 32], [64, 64], [96, 96]],
        hub_layout=True,
        max_shard_size="40KB",
    ),
    # Tiles that are not a multiple of the patch (30 = 3*8 + 6, like SigLIP-so400m's 384 = 27*14
    # + 6): the stride-8 valid convolution drops the last 6 rows and columns of every tile.
    "onevision_tile_not_multiple": dict(
        family="llava_onevision",
        vision_config={"image_size": 30, "patch_size": 8},
        image_grid_pinpoints=[[30, 30], [30, 60], [60, 30], [60, 60], [60, 90], [90, 60]],
    ),
    "next_tile_not_multiple": dict(
        family="llava_next",
        vision_config={"image_size": 30, "patch_size": 8},
        image_grid_pinpoints=[[30, 60], [60, 30], [60, 60], [30, 90], [90, 30]],
    ),
}


def photo(name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """A real photo from scikit-image, optionally resized to (width, height)."""
    from skimage import data

    img = Image.fromarray(getattr(data, name)()).convert("RGB")
    return img.resize(size) if size else img


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    spec = dict(CASES[request.param])
    path = hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp(request.param), seed=len(request.param), **spec
    )
    model = load_pretrained(path)
    processor = model.processor
    return request.param, model, processor, hf_fixtures.load_hf_model(path)


def assert_parity(model, hf_model, batch):
    ours = model(**batch)
    ref = hf_fixtures.hf_hidden_states(hf_model, **batch)
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)
    pooled = model.embed(**batch)
    last = np.array([np.flatnonzero(m)[-1] for m in mask])
    ref_pooled = ref[np.arange(len(last)), last]
    ref_pooled /= np.linalg.norm(ref_pooled, axis=-1, keepdims=True)
    cos = np.sum(pooled * ref_pooled, axis=-1)
    assert cos.min() >= 0.99999, cos
    return pooled


def test_text_only(case):
    _, model, processor, hf_model = case
    texts = ["a dog sitting on the grass", "a red circle left of a blue square above the table"]
    batch = processor([processor.text_prompt(t) for t in texts])
    assert_parity(model, hf_model, batch)


def test_one_image(case):
    _, model, processor, hf_model = case
    batch = processor([processor.image_prompt()], [photo("astronaut")])
    assert "pixel_values" in batch
    assert_parity(model, hf_model, batch)


def test_images_of_different_sizes(case):
    """Extreme aspect ratios and sizes give different tile grids and unpadding in one batch."""
    _, model, processor, hf_model = case
    images = [
        photo("coffee", (300, 20)),
        photo("chelsea", (18, 250)),
        photo("astronaut", (90, 95)),
        photo("rocket"),
    ]
    batch = processor([processor.image_prompt()] * len(images), images)
    counts = batch["attention_mask"].sum(1)
    assert len(set(counts.tolist())) > 1, "the image sizes should give different token counts"
    assert_parity(model, hf_model, batch)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_mixed_batches_match_transformers(case, padding_side):
    """The processor contract: text-only rows anywhere, image rows, either padding side."""
    _, model, processor, hf_model = case
    text, image = processor.text_prompt, processor.image_prompt()
    layouts = {
        # text, image, text, image
        "interleaved": (
            [text("a cat"), image, text("a red circle left of a blue square"), image],
            [None, photo("coffee", (120, 60)), None, photo("astronaut", (40, 40))],
        ),
        # a text row first, then images of different sizes: image k must go to row k + 1
        "text_first": (
            [text("a cat"), image, image, image],
            [None, photo("rocket", (160, 512)), photo("chelsea", (33, 90)), photo("coffee")],
        ),
    }
    for name, (prompts, images) in layouts.items():
        batch = processor(prompts, images, padding_side=padding_side)
        assert len(batch["image_sizes"]) == 2 if name == "interleaved" else 3, name
        assert_parity(model, hf_model, batch)


def test_row_with_two_images(case):
    """Several images in one row (OneVision: base tiles only, as its multi-image mode)."""
    _, model, processor, hf_model = case
    two = processor.image_token + " and " + processor.image_token + " look alike"
    prompts = [processor.text_prompt("a cat"), two, processor.image_prompt()]
    images = [None, [photo("coffee", (90, 60)), photo("rocket", (40, 70))], photo("chelsea")]
    batch = processor(prompts, images)
    assert len(batch["image_sizes"]) == 3
    assert_parity(model, hf_model, batch)


def test_malformed_processor_batches_are_refused(case):
    """Image tokens without pixels, or a run of image tokens broken by a text token, would
    silently embed the wrong thing: both are refused, naming the row."""
    _, model, processor, _ = case
    batch = processor(
        [processor.text_prompt("a cat"), processor.image_prompt()], [None, photo("coffee")]
    )
    no_pixels = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_sizes")}
    with pytest.raises(ValueError, match="row 1 has image tokens, but no pixel_values"):
        model(**no_pixels)
    ids = batch["input_ids"].copy()
    run = np.flatnonzero(ids[1] == processor.image_token_id)
    ids[1, run[len(run) // 2]] = processor.tokenizer.pad_token_id or 0
    ids[1, run[-1] + 1] = processor.image_token_id  # same count, one gap inside the run
    with pytest.raises(ValueError, match=r"row 1: the .* not one unbroken run"):
        model(**(batch | {"input_ids": ids}))


def test_encoded_batches_equal_processor_batches(case):
    """Our fast path (uint8 units packed per group, normalised on device) equals the HF-format
    path (normalised float pixel_values per image) exactly as far as the model can tell."""
    _, model, processor, _ = case
    prompts = [processor.image_prompt(), processor.text_prompt("a dog"), processor.image_prompt()]
    images = [photo("coffee", (70, 30)), None, photo("astronaut", (50, 50))]
    via_hf = model.embed(**processor(prompts, images))
    fast = model.embed_examples(processor.encode_batch(prompts, images))
    np.testing.assert_allclose(fast, via_hf, atol=2e-6)


def test_embedder_images_match_transformers(case):
    """Embedder.embed_images (prompt, processor, batching) gives transformers' embeddings."""
    name, model, processor, hf_model = case
    images = [photo("coffee", (70, 40)), photo("astronaut", (33, 90))]
    embedder = Embedder(model, batch_size=8, progress=False)
    ours = embedder.embed_images(images)
    for i, image in enumerate(images):
        batch = processor([processor.image_prompt()], [image])
        ref = hf_fixtures.hf_hidden_states(hf_model, **batch)[0, batch["attention_mask"][0] > 0][-1]
        ref /= np.linalg.norm(ref)
        assert np.dot(ours[i], ref) >= 0.99999, (name, i)


def test_compiles_once_per_shape(case):
    _, model, processor, _ = case
    batch = processor(
        [processor.image_prompt()] * 2, [photo("coffee", (60, 50)), photo("astronaut", (50, 80))]
    )
    model.embed(**batch)
    traces = model.trace_count
    other = processor(
        [processor.image_prompt()] * 2, [photo("rocket", (70, 40)), photo("chelsea", (45, 45))]
    )
    for _ in range(2):
        model.embed(**(other if other["input_ids"].shape == batch["input_ids"].shape else batch))
    assert model.trace_count == traces
