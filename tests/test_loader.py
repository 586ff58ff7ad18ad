"""The checkpoint loader: what it accepts, and a precise error for every way a directory is broken.

Checkpoints are tiny random LLaVA-NeXT (CLIP + Mistral) ones written by ``save_pretrained``
(``tests/hf_fixtures.py``); broken variants are copies with one file edited. Every error test
asserts on the message, which must name the file or tensor concerned.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests import hf_fixtures
from unime_jax import sharding
from unime_jax.inference import load_pretrained
from unime_jax.models.config import ConfigError
from unime_jax.weights.rules import Match
from unime_jax.weights.safetensors import INDEX_FILE, SINGLE_FILE, CheckpointError

FAMILY = "llava_next"  # CLIP with vision_feature_layer -2: exercises the skipped vision layer


def flat_params(model) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, path)): np.asarray(var.get_value())
        for path, var in model.state.flat_state()
    }


def edit_config(directory, fn) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    fn(config)
    path.write_text(json.dumps(config))


def edit_tensors(file, fn) -> None:
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def escaped(*parts) -> str:
    """A ``match`` pattern for the literal parts in this order, anything in between."""
    return "(?s)" + ".*".join(re.escape(str(p)) for p in parts)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One ``model.safetensors``, names as transformers 5 ``save_pretrained`` writes them."""
    return hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("single"), FAMILY, seed=0)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp("sharded"), FAMILY, seed=0, max_shard_size="40KB"
    )
    assert (path / INDEX_FILE).is_file() and not (path / SINGLE_FILE).exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    return path


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """``vision_tower.vision_model.*`` naming, as on the llava-hf hub."""
    path = hf_fixtures.save_tiny_llava(
        tmp_path_factory.mktemp("hub"), FAMILY, seed=0, hub_layout=True
    )
    assert any(k.startswith("vision_tower.vision_model.") for k in load_file(path / SINGLE_FILE))
    return path


@pytest.fixture(scope="module")
def reference(single):
    """Parameters of the single-file checkpoint on the default 8-device fsdp mesh."""
    return load_pretrained(single)


@pytest.fixture
def ckpt(single, tmp_path):
    """A private copy of the single-file checkpoint, free to break."""
    return shutil.copytree(single, tmp_path / "ckpt")


@pytest.fixture
def sharded_ckpt(sharded, tmp_path):
    return shutil.copytree(sharded, tmp_path / "sharded")


# --------------------------------------------------------------------------- config.json


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=escaped(ckpt, "has no config.json")):
        load_pretrained(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llava_next",')
    with pytest.raises(CheckpointError, match=escaped(ckpt / "config.json", "is not valid JSON")):
        load_pretrained(ckpt)


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=escaped(ckpt / "config.json", "holds a JSON list")):
        load_pretrained(ckpt)


def _set_rope(config):
    config["text_config"]["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
    }


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(model_type="llava"), "model_type 'llava' is not supported"),
        (
            lambda c: c["text_config"].update(model_type="gemma"),
            "text model_type 'gemma' is not supported",
        ),
        (
            lambda c: c["vision_config"].update(model_type="dinov2"),
            "vision model_type 'dinov2' is not supported",
        ),
        (_set_rope, "rope type 'yarn' is not supported"),
        (lambda c: c.update(vision_feature_layer=-7), "vision_feature_layer -7 is out of range"),
        (lambda c: c.pop("text_config"), "lacks the required key 'text_config'"),
    ],
    ids=["model_type", "text_model_type", "vision_model_type", "rope", "feature_layer", "key"],
)
def test_unsupported_config(ckpt, edit, message):
    edit_config(ckpt, edit)
    with pytest.raises(ConfigError, match=escaped(ckpt / "config.json", message)):
        load_pretrained(ckpt)


# --------------------------------------------------------------------------- tensors


def test_no_safetensors(ckpt):
    (ckpt / SINGLE_FILE).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"a torch pickle would be here")
    with pytest.raises(
        CheckpointError,
        match=escaped(
            "no safetensors weights in", ckpt, "save_pretrained(..., safe_serialization=True)"
        ),
    ):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    edit_tensors(
        ckpt / SINGLE_FILE,
        lambda t: t.pop("language_model.model.layers.1.post_attention_layernorm.weight"),
    )
    with pytest.raises(
        CheckpointError,
        match=escaped(
            "1 parameter(s) missing from",
            ckpt,
            "['llm/layers/post_attn_norm/scale[layer 1] "
            "<- language_model.layers.1.post_attention_layernorm.weight']",
        ),
    ):
        load_pretrained(ckpt)


def test_missing_unstacked_tensor(ckpt):
    edit_tensors(ckpt / SINGLE_FILE, lambda t: t.pop("image_newline"))
    with pytest.raises(
        CheckpointError, match=escaped("missing from", ckpt, "['image_newline <- image_newline']")
    ):
        load_pretrained(ckpt)


@pytest.mark.parametrize(
    "name", ["language_model.model.layers.0.self_attn.rotary_emb.inv_freq", "foo.bar"]
)
def test_unexpected_tensor(ckpt, name):
    edit_tensors(ckpt / SINGLE_FILE, lambda t: t.update({name: np.ones(8, np.float32)}))
    with pytest.raises(
        CheckpointError, match=escaped("1 unexpected tensor(s) in", ckpt, f"[{name!r}]")
    ):
        load_pretrained(ckpt)


def test_misshaped_tensor(ckpt):
    name = "multi_modal_projector.linear_1.weight"  # HF (out, in) = (64, 32)
    edit_tensors(ckpt / SINGLE_FILE, lambda t: t.update({name: np.zeros((64, 31), np.float32)}))
    with pytest.raises(
        CheckpointError,
        match=escaped(
            f"tensor {name!r} has shape (64, 31), but config.json implies (64, 32)",
            "projector/linear_1/kernel (32, 64)",
        ),
    ):
        load_pretrained(ckpt)


def test_misshaped_patch_embedding(ckpt):
    name = "vision_tower.embeddings.patch_embedding.weight"  # (32, 3, 8, 8)
    edit_tensors(
        ckpt / SINGLE_FILE, lambda t: t.update({name: np.zeros((32, 3, 4, 4), np.float32)})
    )
    with pytest.raises(
        CheckpointError,
        match=escaped(
            f"tensor {name!r} has shape (32, 3, 4, 4)", "config.json implies (32, 3, 8, 8)"
        ),
    ):
        load_pretrained(ckpt)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "language_model.model.layers.2.input_layernorm.weight",
            "is layer 2, but config.json has 2 layers",
        ),
        (
            "vision_tower.encoder.layers.3.layer_norm1.weight",
            "is vision layer 3, but config.json has 3 vision layers",
        ),
    ],
    ids=["llm", "vision"],
)
def test_layer_beyond_config(ckpt, name, message):
    edit_tensors(ckpt / SINGLE_FILE, lambda t: t.update({name: np.ones(64, np.float32)}))
    with pytest.raises(CheckpointError, match=escaped(repr(name), message)):
        load_pretrained(ckpt)


def test_truncated_file(ckpt):
    file = ckpt / SINGLE_FILE
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=escaped(file, "is corrupt or truncated: tensor")):
        load_pretrained(ckpt)


def test_truncated_header(ckpt):
    file = ckpt / SINGLE_FILE
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=escaped(file, "header length", "exceeds the file size 100")
    ):
        load_pretrained(ckpt)


def test_garbage_header(ckpt):
    file = ckpt / SINGLE_FILE
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    file.write_bytes(data[:8] + b"\xff" * n + data[8 + n :])
    with pytest.raises(CheckpointError, match=escaped(file, "header is not valid JSON")):
        load_pretrained(ckpt)


def test_malformed_header_entry(ckpt):
    file = ckpt / SINGLE_FILE
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    del header["image_newline"]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    file.write_bytes(data[:8] + text + data[8 + n :])
    with pytest.raises(CheckpointError, match=escaped(file, "tensor 'image_newline' is malformed")):
        load_pretrained(ckpt)


# --------------------------------------------------------------------------- sharded index


def test_index_missing_shard(sharded_ckpt):
    weight_map = json.loads((sharded_ckpt / INDEX_FILE).read_text())["weight_map"]
    shard = weight_map["multi_modal_projector.linear_1.weight"]
    (sharded_ckpt / shard).unlink()
    with pytest.raises(
        CheckpointError,
        match=escaped(sharded_ckpt / INDEX_FILE, f"refers to shard {shard}, which is not in"),
    ):
        load_pretrained(sharded_ckpt)


def test_index_tensor_not_in_shard(sharded_ckpt):
    index_file = sharded_ckpt / INDEX_FILE
    index = json.loads(index_file.read_text())
    name = "multi_modal_projector.linear_1.weight"
    right = index["weight_map"][name]
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != right)
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=escaped(index_file, f"lists {name!r} in {wrong}, but that file does not hold it"),
    ):
        load_pretrained(sharded_ckpt)


def test_index_without_weight_map(sharded_ckpt):
    (sharded_ckpt / INDEX_FILE).write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=escaped(sharded_ckpt / INDEX_FILE, "is not a valid safetensors index"),
    ):
        load_pretrained(sharded_ckpt)


# --------------------------------------------------------------------------- paths


def test_nonexistent_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(
        CheckpointError, match=escaped(f"checkpoint directory {missing} does not exist")
    ):
        load_pretrained(missing)


def test_path_is_a_file(ckpt):
    file = ckpt / "config.json"
    with pytest.raises(
        CheckpointError, match=escaped(f"checkpoint path {file} is a file, not a directory")
    ):
        load_pretrained(file)


def test_hub_id_offline(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.chdir(tmp_path)  # "some-org/some-model" must not exist as a relative path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    name = "some-org/some-model"
    with pytest.raises(
        CheckpointError,
        match=escaped(
            f"{name!r} is not a local directory and could not be fetched from the HF hub",
            f"`huggingface-cli download {name} --local-dir /path/to/some-model`",
            "pass its path instead",
        ),
    ):
        load_pretrained(name)


# --------------------------------------------------------------------------- loading


def test_reference_values(reference, single):
    """A few parameters against the raw tensors, one per layout transform."""
    raw = load_file(single / SINGLE_FILE)
    params = flat_params(reference)
    np.testing.assert_array_equal(
        params["llm/layers/attn/q_proj/kernel"][1],
        raw["language_model.model.layers.1.self_attn.q_proj.weight"].T,
    )
    np.testing.assert_array_equal(
        params["vision/patch_embed/kernel"],
        raw["vision_tower.embeddings.patch_embedding.weight"].reshape(32, -1).T,
    )
    np.testing.assert_array_equal(
        params["llm/embed_tokens"], raw["language_model.model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(params["image_newline"], raw["image_newline"])
    # vision_feature_layer -2 of 3 CLIP layers: only layers 0 and 1 are built.
    assert params["vision/layers/attn/q_proj/kernel"].shape[0] == 2


def test_name_tables_round_trip(reference):
    """Every parameter has exactly one checkpoint name, and that name maps back to it."""
    wmap = reference.family.weight_map(reference.config)
    for path, var in reference.state.flat_state():
        stacked = "layers" in (var.get_metadata().get("out_sharding") or ())
        for layer in range(var.shape[0]) if stacked else [None]:
            name = wmap.source_name(path, layer)
            assert name is not None, path
            assert wmap.match(name) == Match(tuple(path), layer, wmap.match(name).transform), name


@pytest.mark.parametrize("layout", ["sharded", "hub"])
def test_layouts_give_the_same_state(reference, layout, request):
    model = load_pretrained(request.getfixturevalue(layout))
    ours, ref = flat_params(model), flat_params(reference)
    assert ours.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(ours[key], ref[key], atol=0, rtol=0, err_msg=key)


def test_text_only(single, reference, caplog):
    caplog.set_level(logging.INFO, logger="unime_jax.weights.loader")
    model = load_pretrained(single, text_only=True)
    module = model.module
    assert module.vision is None and module.projector is None and module.image_newline is None
    assert model.config.vision is None and model.processor.layout is None
    ours, ref = flat_params(model), flat_params(reference)
    assert ours and all(key.startswith("llm/") for key in ours)
    assert ours.keys() == {key for key in ref if key.startswith("llm/")}
    for key in ours:
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
    assert re.search(
        r"skipped \d+ checkpoint tensor\(s\) \(.*multi_modal_projector.*\): text-only model",
        caplog.text,
    )


def test_bfloat16(single, reference):
    model = load_pretrained(single, dtype="bfloat16")
    ours, ref = flat_params(model), flat_params(reference)
    for key, value in ours.items():
        assert value.dtype == ml_dtypes.bfloat16, key
        np.testing.assert_array_equal(value, ref[key].astype(ml_dtypes.bfloat16), err_msg=key)


def test_unknown_dtype(single):
    with pytest.raises(ValueError, match=escaped("dtype 'float8' is not supported")):
        load_pretrained(single, dtype="float8")


def test_params_are_sharded(reference):
    assert reference.mesh.shape["fsdp"] == len(jax.devices()) == 8
    arrays = {"/".join(map(str, p)): v.get_value() for p, v in reference.state.flat_state()}
    assert all(a.sharding.mesh == reference.mesh for a in arrays.values())
    split = [k for k, a in arrays.items() if not a.sharding.is_fully_replicated]
    assert "llm/embed_tokens" in split and "llm/layers/mlp/gate_proj/kernel" in split
    assert "fsdp" in arrays["llm/layers/mlp/gate_proj/kernel"].sharding.spec
    shard = arrays["llm/embed_tokens"].addressable_shards[0]
    assert shard.data.shape == (432, 64 // 8)


def test_two_axis_mesh(single, reference):
    """Callbacks slice correctly when a parameter is split over two mesh axes."""
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = load_pretrained(single, mesh=mesh)
    gate = model.state.flat_state()
    arrays = {"/".join(map(str, p)): v.get_value() for p, v in gate}
    assert tuple(arrays["llm/layers/mlp/gate_proj/kernel"].sharding.spec) == (
        None,
        "fsdp",
        "tensor",
    )
    ref = flat_params(reference)
    for key, value in arrays.items():
        np.testing.assert_array_equal(np.asarray(value), ref[key], err_msg=key)


def test_skips_are_logged(single, caplog):
    caplog.set_level(logging.INFO, logger="unime_jax.weights.loader")
    load_pretrained(single)
    lines = [r.getMessage() for r in caplog.records if r.name == "unime_jax.weights.loader"]
    expected = [
        r"skipped 1 checkpoint tensor\(s\) \(language_model\.lm_head\.weight\): the LM head",
        # CLIP has 3 layers, 16 tensors each; feature layer -2 never reaches layer 2.
        r"skipped 16 checkpoint tensor\(s\) \(vision_tower\.encoder\.layers\.2\..*\): "
        r"vision layers after vision_feature_layer",
        r"skipped 2 checkpoint tensor\(s\) \(vision_tower\.post_layernorm\.bias, "
        r"vision_tower\.post_layernorm\.weight\): .*post-layernorm",
    ]
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), (pattern, lines)
