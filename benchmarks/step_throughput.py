"""The stage-2 train step on CPU: ours (JAX, jitted) vs a PyTorch reference of the same step.

What it measures
----------------
One random ~30M-parameter LLaVA-OneVision-shaped checkpoint (decoder: hidden 512, 8 layers,
8 query / 4 KV heads, MLP 1408; SigLIP-like tower: hidden 256, 6 layers, 64 px tiles of 8 px
patches; written with ``tests.hf_fixtures``), LoRA r=16 (alpha 64, no dropout) on the LLM's
q/k/v/o/gate/up/down and the tower's attention projections, a batch of ``--batch`` MMEB-style
pairs (query: a photo resized to 64 px, i.e. 2 tiles, with an instruction; target: a caption),
the hard-negative loss (k 8, beta 0.1, tau 0.02) and AdamW, in ``--chunks`` GradCache chunks:

* ours: ``steps.make_train_step`` exactly as training runs it (one jitted step: GradCache's
  embedding pass, the loss and its embedding gradient, per-chunk re-forward + backward, AdamW);
* torch: transformers' ``LlavaOnevisionModel`` with our LoRA adapters loaded through
  ``peft`` (the same initial weights), the same loss, and standard GradCache: embeddings of every
  chunk under ``torch.no_grad()``, the loss and ``d loss / d embeddings``, then per chunk a
  re-forward and ``backward(embedding gradient)``, then ``torch.optim.AdamW``.

Both get the same batch; the step-0 loss must agree (printed). After one warm-up step each (ours
compiles), ``--steps`` steps alternate ours / torch; medians are reported, with

    achieved FLOP/s = 3 x F / t_step,   F = analytic forward FLOPs of the whole batch (both sides,
    matmuls and attention, ``unime_jax.flops``): GradCache embeds every example once without
    gradients and once more with them, and the backward pass computes activation gradients only
    (frozen weights get none; the adapters' are negligible), about one forward's FLOPs,

divided by this machine's dense fp32 matmul rate measured in the same run (XLA and torch, a
(rows x 512) @ (512 x 1408) product as in the model's MLP).

Run from the repo root::

    .venv/bin/python benchmarks/step_throughput.py [--batch 64] [--chunks 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings

if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.embed_throughput import PHOTOS, PINPOINTS, SENTENCES, TEXT_CONFIG, photo  # noqa: E402
from configs import stage2  # noqa: E402
from tests import hf_fixtures  # noqa: E402
from unime_jax import sharding, stages, steps, train  # noqa: E402
from unime_jax.demo import tiny_configs  # noqa: E402
from unime_jax.export.peft import export_peft_adapter  # noqa: E402
from unime_jax.inference import load_pretrained  # noqa: E402
from unime_jax.preprocess.images import resize_square  # noqa: E402

VISION = dict(
    hidden_size=256, num_hidden_layers=6, num_attention_heads=4, intermediate_size=1024,
    image_size=64, patch_size=8,
)  # fmt: skip
INSTRUCTION = "<|image_1|> Represent the given image with one word"


def config(args) -> ml_collections.ConfigDict:
    cfg = stage2.get_config()
    cfg.update(
        batch_size=args.batch,
        num_chunks=args.chunks,
        lora_rank=16,
        lora_alpha=64.0,
        lora_dropout=0.0,
        dtype="float32",
        remat="none",
        attention="xla",
        lr=1e-4,
        warmup_steps=0,
        num_steps=1000,
        length_buckets=False,
        image_size=0,  # the rows' photos are already 64 px squares (2 tiles each)
        query_length=args.query_length,
        target_length=args.target_length,
    )
    return cfg


def batch_rows(n: int) -> list[dict]:
    captions = [SENTENCES[i % len(SENTENCES)] + f" number {i}" for i in range(n)]
    images = [resize_square(photo(PHOTOS[i % len(PHOTOS)]), 64) for i in range(n)]
    return [{"qry": INSTRUCTION, "qry_image": im, "pos_text": c} for im, c in zip(images, captions)]


# ------------------------------------------------------------------------------------------
# torch reference


def hard_negative_loss(q, t, tau=0.02, beta=0.1, k=8):
    """The same loss as ``unime_jax.losses.hard_negative_infonce``, in torch."""
    s = q @ t.T
    n = s.shape[0]
    pos = s.diagonal()
    eye = torch.eye(n, dtype=torch.bool)
    valid = ~eye & ~(s > pos[:, None] + beta)
    masked = s.masked_fill(~valid, float("-inf"))
    top, idx = masked.detach().topk(min(k, n - 1), dim=1)
    neg = s.gather(1, idx)
    neg = neg.masked_fill(~torch.isfinite(top), float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1) / tau
    return (-pos / tau + torch.logsumexp(logits, dim=1)).mean()


def torch_embed(model, inputs: dict) -> torch.Tensor:
    hidden = model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    mask = inputs["attention_mask"]
    last = mask.shape[1] - 1 - torch.argmax(mask.flip(1).to(torch.int32), dim=1)
    pooled = hidden[torch.arange(hidden.shape[0]), last].float()
    return torch.nn.functional.normalize(pooled, dim=-1)


def torch_chunks(batch: dict, chunks: int) -> list[dict]:
    """Contiguous chunks of an HF-format batch (one image per row when there are images)."""
    n = len(batch["input_ids"])
    per = n // chunks
    ints = {"input_ids", "attention_mask", "image_sizes", "batch_num_images"}
    out = []
    for c in range(chunks):
        rows = slice(c * per, (c + 1) * per)
        part = {k: v[rows] for k, v in batch.items()}
        out.append(
            {
                k: torch.from_numpy(np.ascontiguousarray(v)).to(
                    torch.long if k in ints else torch.float32
                )
                for k, v in part.items()
            }
        )
    return out


def make_torch_step(model, query_chunks, target_chunks, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, eps=1e-8)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            q = torch.cat([torch_embed(model, c) for c in query_chunks])
            t = torch.cat([torch_embed(model, c) for c in target_chunks])
        q.requires_grad_()
        t.requires_grad_()
        loss = hard_negative_loss(q, t)
        loss.backward()
        for chunks, grad in ((query_chunks, q.grad), (target_chunks, t.grad)):
            for c, g in zip(chunks, grad.split(len(grad) // len(chunks))):
                torch_embed(model, c).backward(g)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss)

    return step


# ------------------------------------------------------------------------------------------


def matmul_rates(rows: int) -> tuple[float, float]:
    """Dense fp32 matmul GFLOP/s of XLA and torch for a (rows x 512) @ (512 x 1408) product."""
    a = np.random.default_rng(0).normal(size=(rows, 512)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(512, 1408)).astype(np.float32)
    flops = 2 * rows * 512 * 1408
    f = jax.jit(lambda x, y: x @ y)
    xa, xb = jnp.asarray(a), jnp.asarray(b)
    f(xa, xb).block_until_ready()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    times = {"xla": [], "torch": []}
    for _ in range(20):
        start = time.perf_counter()
        f(xa, xb).block_until_ready()
        times["xla"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ta @ tb
        times["torch"].append(time.perf_counter() - start)
    return tuple(flops / statistics.median(times[k]) / 1e9 for k in ("xla", "torch"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--query-length", type=int, default=160)
    parser.add_argument("--target-length", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    cfg = config(args)

    with tempfile.TemporaryDirectory(prefix="step_bench_") as tmp:
        tmp = pathlib.Path(tmp)
        vision = tiny_configs.tiny_vision_config("siglip", **VISION)
        path = hf_fixtures.save_tiny_llava(
            tmp / "base", "llava_onevision", vision=vision, text_config=TEXT_CONFIG,
            image_grid_pinpoints=PINPOINTS,
        )  # fmt: skip
        mesh = sharding.make_mesh()
        loaded = load_pretrained(path, mesh=mesh)
        processor, family = loaded.processor, loaded.family
        module = train.add_lora(cfg, family, loaded.module)
        adapter = export_peft_adapter(module, tmp / "lora", base_model_name_or_path=str(path))
        graphdef, trainable, frozen = train.split_trainable(cfg, module)

        from peft import PeftModel

        hf = hf_fixtures.load_hf_model(path).train()
        peft_model = PeftModel.from_pretrained(hf, adapter, is_trainable=True)
        torch_model = peft_model.base_model.model.model  # the base model: no LM head

    # The same rows for both: our packed batch, and the HF-format processor outputs.
    rows = batch_rows(args.batch)
    stage = stages.get(2)
    data = train.make_data(cfg, stage, processor, mesh, source=rows)
    ours_batch = sharding.put_batch(next(data), mesh)
    hf_query = processor([processor.instruction(r["qry"]) for r in rows], [r["qry_image"] for r in rows],
                         max_length=args.query_length)  # fmt: skip
    hf_target = processor([r["pos_text"] for r in rows], max_length=args.target_length)
    assert (hf_query["input_ids"] == np.asarray(ours_batch["query"].input_ids)).all()

    tx = steps.make_optimizer(cfg)
    step = steps.make_train_step(
        graphdef, tx, cfg, mesh, stage.loss_fn(cfg), stage.sides, trainable, frozen
    )
    state = steps.init_state(trainable, tx, cfg.seed, mesh)
    torch_step = make_torch_step(
        torch_model,
        torch_chunks(hf_query, args.chunks),
        torch_chunks(hf_target, args.chunks),
        cfg.lr,
    )

    holder = {"state": state}

    def ours() -> float:
        holder["state"], metrics = step(holder["state"], frozen, ours_batch)
        return float(metrics["loss"])

    start = time.perf_counter()
    loss_ours = ours()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    loss_torch = torch_step()
    torch_first = time.perf_counter() - start
    times = {"ours": [], "torch": []}
    for _ in range(args.steps):
        for name, fn in (("ours", ours), ("torch", torch_step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    t_ours, t_torch = statistics.median(times["ours"]), statistics.median(times["torch"])
    pool = ours_batch["query"].images["pixels"].shape  # (groups, tiles per group, ...)
    units = pool[0] * pool[1]  # tiles the tower runs on, padding slots included
    forward = family.forward_flops(loaded.config, args.batch, args.query_length, units)
    forward += family.forward_flops(loaded.config, args.batch, args.target_length, 0)
    xla_rate, torch_rate = matmul_rates(args.batch * args.query_length)
    achieved = 3 * forward / t_ours / 1e9
    achieved_torch = 3 * forward / t_torch / 1e9
    n_params = sum(p.numel() for p in hf.parameters())

    print("== step_throughput ==")
    print(
        f"jax {jax.__version__} ({jax.device_count()} CPU device)  torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)  cpu_count {os.cpu_count()}  "
        f"load average {'/'.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"model {n_params / 1e6:.1f}M params, LoRA r16 on LLM + tower attention; batch {args.batch} "
        f"in {args.chunks} chunks; query {args.query_length} tokens + {units} tiles, target "
        f"{args.target_length} tokens (text only); fp32"
    )
    print(f"step-0 loss: ours {loss_ours:.6f}  torch {loss_torch:.6f}  "
          f"(rel. diff {abs(loss_ours - loss_torch) / abs(loss_torch):.1e})")  # fmt: skip
    print(f"{'':<8}{'step s':>8}{'ex/s':>8}{'GFLOP/s':>9}{'of XLA matmul':>15}")
    for name, t, rate in (("ours", t_ours, achieved), ("torch", t_torch, achieved_torch)):
        print(f"{name:<8}{t:>8.3f}{args.batch / t:>8.1f}{rate:>9.1f}{rate / xla_rate:>15.2f}")
    print(f"ours / torch: {t_torch / t_ours:.2f}x   (ours compile + first step {compile_s:.1f} s, "
          f"torch first step {torch_first:.1f} s)")  # fmt: skip
    print(f"dense fp32 matmul ({args.batch * args.query_length}x512 @ 512x1408): XLA {xla_rate:.1f} "
          f"GFLOP/s, torch {torch_rate:.1f} GFLOP/s; F = {forward / 1e9:.1f} GFLOP per forward")  # fmt: skip


if __name__ == "__main__":
    main()
