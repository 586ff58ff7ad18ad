"""Stage 1: textual discriminative knowledge distillation into the LLM (UniME §stage 1).

    # 1. the corpus as a TFDS dataset, and its teacher embeddings, once, offline (PyTorch):
    python -m unime_jax.datasets build nli_simcse --manual_dir /data/simcse --data_dir /data/tfds
    python -m unime_jax.teacher --dataset nli_simcse --data_dir /data/tfds \
        --out /data/nv_embed_nli --teacher /ckpt/NV-Embed-v2 --dtype float16
    # 2. distillation; writes WORKDIR/merged, an HF checkpoint stage 2 starts from:
    python -m unime_jax.main --config=configs/stage1.py --workdir=runs/s1 \
        --config.model=/ckpt/llava-onevision-qwen2-7b-ov-hf \
        --config.data_dir=/data/tfds --config.teacher_dir=/data/nv_embed_nli
    python -m unime_jax.main --config=configs/stage2.py --workdir=runs/s2 \
        --config.model=runs/s1/merged --config.data_dir=/data/tfds

    python -m unime_jax.main --config=configs/stage1.py:demo --workdir=runs/demo_s1   # offline

Presets: ``llava_onevision_7b`` / ``llava_next_7b`` / ``phi35v`` / ``qwen2_vl_2b`` /
``qwen2_vl_7b`` / ``qwen2_5_vl_7b`` (the paper's recipe; identical for every backbone) and
``demo`` (the demo model on demo-world captions with the MiniLM teacher).
"""

import ml_collections

from configs.stage2 import QWEN_VL
from configs.stage2 import base as stage2_base


def base() -> ml_collections.ConfigDict:
    c = stage2_base()  # model, dtype, optimiser, mesh and bookkeeping fields are shared
    c.stage = 1
    for field in (
        "train_data",
        "query_length",
        "target_length",
        "max_tiles",
        "image_size",
        "tile_budget",
        "loss",
        "temperature",
        "margin",
        "filter_false_negatives",
        "num_hard_negatives",
        "infonce_steps",
    ):
        del c[field]
    # Data: a prepared sentence dataset, NAME[/CONFIG][:SPLIT] (in data_dir, as for stage 2), and
    # the output directory of `python -m unime_jax.teacher --dataset NAME` for exactly it.
    c.corpus = "nli_simcse"
    c.teacher_dir = ""
    c.eval_corpus = ""  # optional held-out sentences (+ their teacher_dir) for teacher agreement
    c.eval_teacher_dir = ""
    c.teacher_bad_rows = "error"  # non-finite / zero teacher vectors: "error" or "skip" (counted)
    c.teacher_dim = 4096  # the teacher's width (NV-Embed-v2); only `unime_jax.aot` reads it
    c.max_sentence_tokens = 32  # E5-V's truncation, before the chat template
    c.text_length = 96  # fixed token length on device: chat template (~20-35) + 32 tokens
    # Loss: mean_i KL(P_teacher[i] || P_student[i]) over the global batch (directions: open).
    c.kd_temperature = 0.05  # open in the paper
    c.kd_direction = "teacher_student"  # or "student_teacher", "symmetric"
    c.kd_keep_diagonal = True
    # Optimisation (E5-V / UniME): 2 epochs of batch 768, lr 5e-4, warmup 100.
    c.batch_size = 768
    c.num_chunks = 8
    c.num_epochs = 2
    c.num_steps = 0  # 0 = num_epochs over the corpus
    c.warmup_steps = 100
    c.lr = 5e-4
    # LoRA on the LLM only (E5-V values; alpha and dropout are open in the paper).
    c.lora_rank = 32
    c.lora_alpha = 16.0
    c.lora_dropout = 0.05
    c.lora_targets = "llm"
    c.demo_teacher = "all-MiniLM-L6-v2"
    return c


def get_config(preset: str = "llava_onevision_7b") -> ml_collections.ConfigDict:
    c = base()
    if preset == "llava_onevision_7b":
        return c
    if preset == "llava_next_7b":
        c.reference_model = "llava-v1.6-mistral-7b-hf"
        return c
    if preset == "phi35v":  # UniME-Phi3.5-V-4.2B: Phi-3.5-mini, fused qkv / gate_up LoRA
        c.reference_model = "Phi-3.5-vision-instruct"
        return c
    if preset in QWEN_VL:  # Qwen2-VL / Qwen2.5-VL: the Qwen2 LLM with M-RoPE (1-D for text)
        c.reference_model = QWEN_VL[preset]
        return c
    if preset == "demo":
        c.model = "demo"
        c.corpus = "shapes_world/nli"  # generated; MiniLM teacher files under WORKDIR/demo_data
        c.eval_corpus = "shapes_world/nli:heldout"
        c.dtype = "float32"
        c.remat = "none"
        c.attention = "xla"
        c.lora_dropout = 0.0
        c.batch_size = 64
        c.num_chunks = 2
        c.num_epochs = 1
        c.warmup_steps = 20
        c.lr = 3e-3
        c.text_length = 64
        c.length_buckets = False
        c.demo_train_rows = 4000  # x3 sentences (sent0, sent1, hard_neg)
        c.demo_eval_size = 200
        return c
    raise ValueError(
        f"unknown stage-1 preset {preset!r}; use llava_onevision_7b, llava_next_7b, phi35v, "
        f"{', '.join(QWEN_VL)} or demo"
    )
