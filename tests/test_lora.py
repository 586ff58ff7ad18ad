"""LoRA: targeting, exact identity at init, merge == unmerged forward, gradients only on adapters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unime_jax import sharding
from unime_jax.models.config import LlavaConfig
from unime_jax.models.lora import LLM_TARGETS, VISION_ATTENTION_TARGETS, apply_lora, merge_lora
from unime_jax.models.mllm import LlavaModel, last_token_pool
from unime_jax.tiny import build_tokenizer, tiny_llava_config


def tiny_model(seed=0, dtype=jnp.float32) -> LlavaModel:
    tok = build_tokenizer("qwen2")
    cfg = LlavaConfig.from_hf(tiny_llava_config("llava_onevision", len(tok), tok.image_token_id))
    return LlavaModel(cfg, rngs=nnx.Rngs(seed), dtype=dtype)


def inputs(model: LlavaModel, rows=4, length=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 400, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, 9:] = 0
    return jnp.asarray(ids), jnp.asarray(mask)


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
    ids, mask = inputs(base)
    np.testing.assert_array_equal(np.asarray(adapted(ids, mask)), np.asarray(base(ids, mask)))


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
    ids, mask = inputs(model)
    unmerged = np.asarray(model(ids, mask))
    assert not np.allclose(unmerged, np.asarray(tiny_model()(ids, mask)), atol=1e-3)
    merged_paths = merge_lora(model)
    assert len(merged_paths) == 11 and model.llm.layers.attn.q_proj.lora_a is None
    np.testing.assert_allclose(np.asarray(model(ids, mask)), unmerged, atol=2e-5)


def test_only_lora_params_get_gradients_and_dropout_uses_the_key():
    model = tiny_model(dtype=jnp.bfloat16)  # frozen base may stay bf16
    apply_lora(model, LLM_TARGETS, rank=4, alpha=8, dropout=0.5, rngs=nnx.Rngs(4))
    randomize_b(model)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(trainable))
    assert jax.tree.leaves(frozen)[0].dtype == jnp.bfloat16
    ids, mask = inputs(model)

    def loss(trainable, key):
        h = nnx.merge(graphdef, trainable, frozen)(ids, mask, dropout_key=key)
        return jnp.sum(last_token_pool(h, mask)[:, :8])

    grads = jax.grad(loss)(trainable, jax.random.key(0))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {np.dtype("float32")}
    assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))
    same = loss(trainable, jax.random.key(7)), loss(trainable, jax.random.key(7))
    assert float(same[0]) == float(same[1])
    assert float(loss(trainable, jax.random.key(8))) != float(same[0])
    assert float(loss(trainable, None)) == float(loss(trainable, None))


def test_adapters_shard_with_their_kernels():
    model = tiny_model()
    apply_lora(model, LLM_TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(5))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    specs = sharding.state_shardings(nnx.state(model, nnx.LoRAParam), mesh)
    b_spec = specs["llm"]["layers"]["mlp"]["up_proj"]["lora_b"]
    b_spec = b_spec.value if isinstance(b_spec, nnx.Variable) else b_spec
    assert b_spec.spec == jax.sharding.PartitionSpec(None, None, "tensor")
