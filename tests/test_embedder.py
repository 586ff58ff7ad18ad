"""Embedder API, UniME prompts per backbone, fixed batch shapes, and the embed CLI."""

import json

import numpy as np
import pytest

from tests import hf_fixtures
from tests.test_model_parity import photo
from unime_jax import embed as embed_cli
from unime_jax.embedder import Embedder
from unime_jax.preprocess.processor import Processor
from unime_jax.preprocess.text import bucket_length


@pytest.fixture(scope="module", params=["llava_onevision", "llava_next"])
def checkpoint(request, tmp_path_factory):
    return hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp(request.param), request.param, seed=5
    )


@pytest.fixture(scope="module")
def embedder(checkpoint):
    return Embedder.from_pretrained(checkpoint, batch_size=8, progress=False)


def test_prompts_follow_the_backbone(embedder):
    p = embedder.processor
    if p.family == "llava_next":
        assert p.image_prompt() == "[INST] <image>\nSummary above image in one word: [/INST]"
        assert p.text_prompt("a cat") == "[INST] a cat\nSummary above sentence in one word: [/INST]"
    else:
        assert p.image_prompt().startswith("<|im_start|>user\n<image>")
        assert "Summary above image in one word:\n<|im_end|>" in p.image_prompt()
        assert p.image_prompt().endswith("<|im_start|>assistant\n")
        assert "a cat\nSummary above sentence in one word:\n" in p.text_prompt("a cat")
    assert (
        p.instruction("<|image_1|> Represent the given image")
        == "<image> Represent the given image"
    )


def test_embeddings_match_direct_model_calls(embedder):
    """Batching, padding rows and buckets do not change any embedding."""
    texts = [
        f"a {c} circle"
        for c in ("red", "blue", "green", "black", "white", "yellow", "pink", "grey", "brown")
    ]
    batched = embedder.embed_texts(texts)  # 9 texts: two batches of 8, the second padded
    p = embedder.processor
    one_by_one = np.concatenate([embedder.model.embed(**p([p.text_prompt(t)])) for t in texts[:3]])
    np.testing.assert_allclose(batched[:3], one_by_one, atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)


def test_images_texts_and_instructions(embedder, tmp_path):
    path = tmp_path / "coffee.jpg"
    photo("coffee").save(path)
    from_path = embedder.embed_images([str(path)])
    from_pil = embedder.embed_images([photo("coffee").convert("RGB")])
    assert from_path.shape == (1, embedder.dim)
    assert np.dot(from_path[0], from_pil[0]) > 0.999  # JPEG round trip only
    texts = ["<|image_1|> Represent the given image", "Find a dog", "<|image_1|> and <|image_1|>"]
    images = [path, None, [path, photo("rocket", (40, 90))]]
    mixed = embedder.embed_instructions(texts, images)
    assert mixed.shape == (3, embedder.dim)
    for i in range(3):  # each row as it would be alone: packing and batching change nothing
        alone = embedder.embed_instructions(texts[i : i + 1], images[i : i + 1])
        np.testing.assert_allclose(mixed[i], alone[0], atol=2e-6)


def test_fixed_shapes_compile_once(embedder):
    embedder.embed_texts(["a dog"])
    traces = embedder.model.trace_count
    embedder.embed_texts(["a cat on a mat", "two dogs"] * 5)  # same bucket, 2 batches
    assert embedder.model.trace_count == traces


def test_processor_errors(embedder):
    p: Processor = embedder.processor
    with pytest.raises(ValueError, match=r"prompt 0 has 1 image token\(s\) but 0 image\(s\)"):
        p([p.image_prompt()])
    with pytest.raises(ValueError, match="the prompt has 1 image token"):
        p.encode(p.image_prompt())
    with pytest.raises(ValueError, match="2 prompts but 1 image entries"):
        p(["a", "b"], [None])
    with pytest.raises(FileNotFoundError, match=r"does-not-exist\.jpg"):
        p([p.image_prompt()], ["/nowhere/does-not-exist.jpg"])
    with pytest.raises(ValueError, match="exceeds the largest length bucket"):
        bucket_length(10**6)


def test_cli_prints_similarity_matrix(checkpoint, tmp_path, capsys):
    img = tmp_path / "rocket.png"
    photo("rocket", (64, 96)).save(img)
    assert (
        embed_cli.main(
            [
                "--model",
                str(checkpoint),
                "--text",
                "a rocket",
                "--text",
                "a dog",
                "--image",
                str(img),
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == ["a rocket", "a dog"] and out["columns"] == [str(img)]
    assert np.array(out["similarity"]).shape == (2, 1)
    assert (
        embed_cli.main(
            ["--model", str(checkpoint), "--text", "a", "--text", "b", "--mesh", "data=2,fsdp=4"]
        )
        == 0
    )
    assert "1.0000" in capsys.readouterr().out
