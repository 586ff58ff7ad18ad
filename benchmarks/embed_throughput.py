"""Embedding throughput on CPU: our jitted JAX/Flax-NNX model vs. the transformers PyTorch model.

What it measures
----------------
One medium-size *random* LLaVA checkpoint (same weights and config for both sides) is written to
a temp dir with ``tests.hf_fixtures.save_tiny_llava``: a decoder with hidden 512, 8 layers,
8 query / 4 KV heads, MLP 1408 and the tiny offline tokenizer's vocab; a vision tower with
hidden 256, 6 layers, 64x64 tiles of 8x8 patches (64 patches per tile) and AnyRes pinpoints up
to 2x2 tiles (so at most 1 base + 4 grid tiles per image). Then, for two workloads,

* ``text``:  ``--batch`` different sentences wrapped in the UniME text prompt,
* ``image``: ``--batch`` real photos from ``skimage.data`` with the UniME image prompt,

the *same* numpy processor outputs (the family processor; preprocessing is not
timed) are embedded by

* ours:  ``EmbeddingModel.embed(**batch)`` from ``unime_jax.inference.load_pretrained`` (one jitted
  forward, last-token pooling and L2 norm on device, result converted to numpy, so the device
  sync is inside the timing);
* torch: ``LlavaOnevisionModel`` / ``LlavaNextModel`` (the base model, no LM head) under
  ``torch.no_grad()``, eval mode, fp32, ``torch.set_num_threads(os.cpu_count())``, the attention
  implementation transformers picks by default (sdpa; printed), then the same last-token pooling
  and L2 norm, converted to numpy.

Each side gets one warm-up call (for ours that call traces and compiles; its time is reported
separately as "compile"), then ``--steps`` timed calls, alternating ours / torch step by step so
that background load hits both in the same stretch of time; the table shows the median
examples/s and the ratio ours / torch. The 1/5/15-minute load average is printed before and
after, with a warning when the CPU is already busy: other processes skew the numbers *and* the
ratio (torch's OpenMP threads lose far more to contention than XLA's; on a loaded 2-core box
the text ratio inflated from ~1x to ~4x), so only compare quiet runs. The cosine between the two
sides' embeddings is printed as a sanity check (fp32: expect > 0.9999; lower with bfloat16).

JAX runs on ONE CPU device: unless ``XLA_FLAGS`` is already set in the environment, this script
sets ``--xla_force_host_platform_device_count=1`` (XLA's CPU backend still uses all cores for
one device's ops). If you set ``XLA_FLAGS`` yourself (e.g. to fake 8 devices) the model is
sharded over all of them and the printed device count says so.

Run from the repo root::

    .venv/bin/python benchmarks/embed_throughput.py [--family llava_onevision|llava_next] \
        [--batch 8] [--steps 5] [--dtype float32]

``--dtype`` sets our parameter dtype (float32 | bfloat16); torch always runs fp32. One run takes
about 1.5 minutes on a quiet 2-core CPU (2 to 6 minutes when other processes load it).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from tests import hf_fixtures  # noqa: E402
from unime_jax.demo import tiny_configs as tiny  # noqa: E402
from unime_jax.inference import load_pretrained  # noqa: E402

# Medium-size config, shared by both sides.
TEXT_CONFIG = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1408,
)
VISION_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    intermediate_size=1024,
    image_size=64,
    patch_size=8,
)
PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]  # up to 2x2 tiles of 64 px
VISION_KIND = {"llava_onevision": "siglip", "llava_next": "clip"}

SENTENCES = [
    "a dog sitting on the grass",
    "a red circle left of a blue square above the table",
    "two people riding bikes along the street in the city",
    "a cat lying on a wooden chair next to the window",
    "an astronaut holding a flag in space",
    "a cup of coffee on a white saucer",
    "a small boat on the ocean under a bright blue sky",
    "children playing with a ball in the park",
]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel"]
PHOTOS += ["camera", "coins", "clock", "moon"]  # grayscale, converted to RGB


def photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def build_checkpoint(path: pathlib.Path, family: str) -> pathlib.Path:
    vision = tiny.tiny_vision_config(VISION_KIND[family], **VISION_CONFIG)
    return hf_fixtures.save_tiny_llava(
        path, family, vision=vision, text_config=TEXT_CONFIG, image_grid_pinpoints=PINPOINTS
    )


def load_torch_model(path: pathlib.Path) -> torch.nn.Module:
    """The HF base model (vision tower + projector + decoder, no LM head), default attention."""
    model_cls = hf_fixtures._FAMILIES[transformers.AutoConfig.from_pretrained(path).model_type][1]
    full = model_cls.from_pretrained(path, dtype=torch.float32).eval()
    return full.model


_INT_KEYS = {"input_ids", "attention_mask", "image_sizes", "batch_num_images"}


@torch.no_grad()
def torch_embed(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> np.ndarray:
    inputs = {
        k: torch.from_numpy(np.ascontiguousarray(v)).to(
            torch.long if k in _INT_KEYS else torch.float32
        )
        for k, v in batch.items()
    }
    hidden = model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    mask = inputs["attention_mask"]
    t = mask.shape[1]
    last = t - 1 - torch.argmax(mask.flip(1).to(torch.int32), dim=1)  # left or right padding
    pooled = hidden[torch.arange(hidden.shape[0]), last].float()
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def time_interleaved(
    fns: dict[str, Callable[[], np.ndarray]], steps: int
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, np.ndarray]]:
    """Warm-up seconds, per-step seconds and last output of each fn.

    After one warm-up call each, the fns take turns step by step, so background load on a
    shared machine hits both sides alike instead of whichever happened to run during it.
    """
    warmup, times, outs = {}, {k: [] for k in fns}, {}
    for key, fn in fns.items():
        start = time.perf_counter()
        outs[key] = fn()
        warmup[key] = time.perf_counter() - start
    for _ in range(steps):
        for key, fn in fns.items():
            start = time.perf_counter()
            outs[key] = fn()
            times[key].append(time.perf_counter() - start)
    return warmup, times, outs


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _busy(cpus: int) -> bool:
    """True when the 1-minute load average (before this script's work) exceeds half the CPUs."""
    try:
        return os.getloadavg()[0] > 0.5 * cpus
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(VISION_KIND), default="llava_onevision")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="embed_bench_") as tmp:
        path = build_checkpoint(pathlib.Path(tmp), args.family)
        ours = load_pretrained(path, dtype=args.dtype)
        processor = ours.processor
        theirs = load_torch_model(path)

    n_params = sum(p.numel() for p in theirs.parameters())
    attn = theirs.config._attn_implementation
    print("== embed_throughput ==")
    print(
        f"python {platform.python_version()}  jax {jax.__version__} ({jax.default_backend()}, "
        f"{jax.device_count()} device(s))  torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)  transformers {transformers.__version__}  "
        f"cpu_count {threads}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  load average {_loadavg()}")
    if _busy(threads):
        print(
            "WARNING: the CPU is busy with other processes. torch's OpenMP threads slow down far "
            "more under contention than XLA's, so the numbers and the ratio are not representative."
        )
    print(
        f"family {args.family}  params {n_params / 1e6:.1f}M  ours dtype {args.dtype}, "
        f"torch float32 attn={attn}  batch {args.batch}  steps {args.steps} (median)"
    )

    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]
    images = [photo(PHOTOS[i % len(PHOTOS)]) for i in range(args.batch)]
    workloads = {
        "text": processor([processor.text_prompt(s) for s in sentences]),
        "image": processor([processor.image_prompt()] * args.batch, images),
    }

    rows = []
    for name, batch in workloads.items():
        fns = {
            "ours": lambda b=batch: ours.embed(**b),
            "torch": lambda b=batch: torch_embed(theirs, b),
        }
        warmup, times, outs = time_interleaved(fns, args.steps)
        ours_eps = args.batch / statistics.median(times["ours"])
        torch_eps = args.batch / statistics.median(times["torch"])
        compile_s = warmup["ours"]
        cos = float(np.min(np.sum(outs["ours"] * outs["torch"], axis=-1)))
        shape = "x".join(str(s) for s in batch["input_ids"].shape)
        if "pixel_values" in batch:
            shape += f", {batch['pixel_values'].shape[1]} tiles"
        rows.append((name, shape, ours_eps, torch_eps, ours_eps / torch_eps, compile_s, cos))

    header = (
        f"{'workload':<9} {'tokens (BxT)':<18} {'ours ex/s':>10} {'torch ex/s':>11} "
        f"{'ours/torch':>11} {'ours compile s':>15} {'min cos':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, shape, o, t, ratio, comp, cos in rows:
        print(
            f"{name:<9} {shape:<18} {o:>10.2f} {t:>11.2f} {ratio:>11.2f} {comp:>15.2f} {cos:>9.5f}"
        )
    print("compile s = first call of ours (trace + XLA compile + one run), not in the ex/s.")
    print(f"load average at the end {_loadavg()} (other processes on the CPU skew the numbers)")


if __name__ == "__main__":
    main()
