"""Every test runs JAX on 8 fake CPU devices, so sharding is real, not simulated."""

import os
import tempfile

# Prepared TFDS datasets (the demo's shapes world, coco_mini) go to a directory of this session,
# never to ~/tensorflow_datasets; tensorflow_datasets reads the variable when it is imported.
os.environ.setdefault("TFDS_DATA_DIR", tempfile.mkdtemp(prefix="unime_tfds_"))
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/unime_jax/jax"))
