"""Trained models out: full Hugging Face checkpoints (LoRA merged) and PEFT LoRA adapters."""

from unime_jax.export.hf import ExportError, export_hf
from unime_jax.export.peft import export_peft_adapter

__all__ = ["ExportError", "export_hf", "export_peft_adapter"]
