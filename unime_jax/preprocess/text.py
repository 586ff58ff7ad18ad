"""Prompt strings, sequence-length buckets and sentence truncation."""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<|image_1|>"  # MMEB's (and Phi-3.5-V's) image placeholder in instructions
IMAGE_PROMPT = "Summary above image in one word:"
TEXT_PROMPT = "\nSummary above sentence in one word:"
LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bucket_length(n: int, buckets: Sequence[int] = LENGTH_BUCKETS) -> int:
    """The smallest bucket that holds ``n`` tokens (padding to a few lengths: few compilations)."""
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"a sequence of {n} tokens exceeds the largest length bucket {buckets[-1]}")


def truncate(tokenizer, sentence: str, max_tokens: int) -> str:
    """The sentence cut to its first ``max_tokens`` tokens (unchanged when shorter)."""
    ids = tokenizer(sentence, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return sentence
    return tokenizer.decode(ids[:max_tokens])
