"""The forward on 8 fake devices, at two mesh shapes, equals the single-device forward."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests import hf_fixtures
from tests.test_model_parity import photo
from unime_jax import sharding
from unime_jax.inference import load_pretrained

MESHES = {
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp4_tensor2": {"fsdp": 4, "tensor": 2},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return hf_fixtures.save_tiny_llava(tmp_path_factory.mktemp("ov"), "llava_onevision", seed=3)


@pytest.fixture(scope="module")
def inputs(checkpoint):
    single = load_pretrained(checkpoint, mesh=sharding.make_mesh({"fsdp": 1}, jax.devices()[:1]))
    processor = single.processor
    prompts = [
        processor.image_prompt(),
        processor.text_prompt("a dog on a red mat"),
        processor.image_prompt(),
    ]
    batch = processor(prompts, [photo("coffee", (100, 40)), None, photo("astronaut")])
    return batch, single(**batch), single.embed(**batch)


def test_mesh_construction_errors():
    with pytest.raises(ValueError, match="needs 6 devices, but 8"):
        sharding.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})
    assert sharding.make_mesh({"data": 2, "fsdp": -1}).shape["fsdp"] == 4


def test_logical_rules_respect_divisibility():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == PartitionSpec(
        "fsdp", "tensor"
    )
    # 6 is not divisible by 4: that dimension stays replicated rather than failing to compile.
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 128), mesh) == PartitionSpec(
        None, "tensor"
    )
    with pytest.raises(KeyError, match="no rule"):
        sharding.logical_to_spec(("nonsense",), (8,), mesh)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_equals_single_device(checkpoint, inputs, mesh_name):
    batch, hidden, pooled = inputs
    mesh = sharding.make_mesh(MESHES[mesh_name])
    model = load_pretrained(checkpoint, mesh=mesh)
    q_kernel = model.state["llm"]["layers"]["attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert len(q_kernel.addressable_shards) == 8
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(model(**batch)[mask], hidden[mask], atol=2e-5)
    np.testing.assert_allclose(model.embed(**batch), pooled, atol=2e-6)
    # Same shapes again: no new trace.
    traces = model.trace_count
    model.embed(**batch)
    assert model.trace_count == traces
