"""LoRA: targeting, exact identity at init, merge == unmerged forward, gradients only on adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unime_jax import sharding
from unime_jax.demo.tiny_configs import tiny_llava_config
from unime_jax.demo.tokenizers import build_tokenizer
from unime_jax.families.llava import ONEVISION
from unime_jax.models.inputs import ModelInputs
from unime_jax.models.lora import apply_lora, merge_lora
from unime_jax.models.multimodal import last_token_pool

LLM_TARGETS = ONEVISION.lora_targets["llm"]
VISION_ATTENTION_TARGETS = ONEVISION.lora_targets["vision_attention"]


def tiny_model(seed=0, dtype=jnp.float32):
    tok = build_tokenizer("qwen2")
    cfg = ONEVISION.parse_config(tiny_llava_config("llava_onevision", len(tok), tok.image_token_id))
    return ONEVISION.build(cfg, rngs=nnx.Rngs(seed), dtype=dtype)


def inputs(model, rows=4, length=12) -> ModelInputs:
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 400, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, 9:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ModelInputs(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))


def randomize_b(model, seed=1):
    """B starts at zero; give it values so that merge/forward differences would show."""
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam) and not np.any(np.asarray(var[...])):
            var.set_value(0.1 * jax.random.normal(jax.random.key(seed), var.shape))


def test_targets_match_and_log(caplog):
    model = tiny_model()
    with caplog.at_level("INFO", logger="unime_jax.models.lora"):
        paths = apply_lora(
            model, LLM_TARGETS + VISION_ATTENTION_TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(1)
        )
    assert "llm/layers/attn/q_proj" in paths and "llm/layers/mlp/down_proj" in paths
    assert "vision/layers/attn/out_proj" in paths
    assert "vision/layers/mlp/fc1" not in paths and "projector/linear_1" not in paths
    assert len(paths) == 7 + 4
    assert "LoRA r=4" in caplog.text
    a = model.llm.layers.attn.q_proj.lora_a
    assert a.shape == (2, 64, 4)  # stacked over the 2 layers
    assert a.get_metadata()["out_sharding"] == ("layers", "embed", "lora")
    with pytest.raises(ValueError, match="matched no Linear layer"):
        apply_lora(tiny_model(), [r"^nothing$"], rank=4, alpha=8, rngs=nnx.Rngs(0))


def test_zero_b_is_exactly_the_base_model():
    base, adapted = tiny_model(), tiny_model()
    apply_lora(adapted, LLM_TARGETS, rank=8, alpha=16, rngs=nnx.Rngs(2))
    batch = inputs(base)
    np.testing.assert_array_equal(np.asarray(adapted(batch)), np.asarray(base(batch)))


def test_merge_equals_unmerged_forward():
    model = tiny_model()
    apply_lora(
        model,
        LLM_TARGETS + VISION_ATTENTION_TARGETS,
        rank=4,
        alpha=16,
        dropout=0.1,
        rngs=nnx.Rngs(3),
    )
    randomize_b(model)
    batch = inputs(model)
    unmerged = np.asarray(model(batch))
    assert not np.allclose(unmerged, np.asarray(tiny_model()(batch)), atol=1e-3)
    merged_paths = merge_lora(model)
    assert len(merged_paths) == 11 and model.llm.layers.attn.q_proj.lora_a is None
    np.testing.assert_allclose(np.asarray(model(batch)), unmerged, atol=2e-5)


def test_only_lora_params_get_gradients_and_dropout_uses_the_key():
    model = tiny_model(dtype=jnp.bfloat16)  # frozen base may stay bf16
    apply_lora(model, LLM_TARGETS, rank=4, alpha=8, dropout=0.5, rngs=nnx.Rngs(4))
    randomize_b(model)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(trainable))
    assert jax.tree.leaves(frozen)[0].dtype == jnp.bfloat16
    batch = inputs(model)

    def loss(trainable, key):
        h = nnx.merge(graphdef, trainable, frozen)(batch, dropout_key=key)
        return jnp.sum(last_token_pool(h, batch.attention_mask)[:, :8])

    grads = jax.grad(loss)(trainable, jax.random.key(0))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    # Dropout is on with a key, drawn from the key (same key, same masks), off without one.
    with_7, again_7 = (
        float(loss(trainable, jax.random.key(7))),
        float(loss(trainable, jax.random.key(7))),
    )
    without = float(loss(trainable, None))
    assert with_7 == again_7
    assert float(loss(trainable, jax.random.key(8))) != with_7
    assert without != with_7
    # Without a key the adapted forward is the deterministic one: zero B gives the base model.
    zero_b = jax.tree.map(lambda x: x, trainable)
    for path, var in zero_b.flat_state():
        if path[-1] == "lora_b":
            var.set_value(jnp.zeros_like(var.get_value()))
    base = tiny_model(dtype=jnp.bfloat16)
    base_out = jnp.sum(last_token_pool(base(batch), batch.attention_mask)[:, :8])
    assert float(loss(zero_b, None)) == float(base_out)


def test_adapters_shard_with_their_kernels():
    model = tiny_model()
    apply_lora(model, LLM_TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(5))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    specs = sharding.state_shardings(nnx.state(model, nnx.LoRAParam), mesh)
    b_spec = specs["llm"]["layers"]["mlp"]["up_proj"]["lora_b"]
    b_spec = b_spec.value if isinstance(b_spec, nnx.Variable) else b_spec
    assert b_spec.spec == jax.sharding.PartitionSpec(None, None, "tensor")
