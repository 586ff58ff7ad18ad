"""Embed texts and images from the command line and print their cosine similarities.

    python -m unime_jax.embed --model DIR --text "a dog" --text "a cat" --image dog.jpg

With texts and images, rows are texts and columns images; with only one kind, all against all.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from unime_jax import sharding
from unime_jax.embedder import Embedder, similarity
from unime_jax.errors import ArgumentParser, UsageError, run_main


def parse_mesh(spec: str | None) -> dict[str, int] | None:
    """ "data=2,fsdp=4" -> {"data": 2, "fsdp": 4}."""
    if not spec:
        return None
    try:
        return {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}
    except ValueError as e:
        raise UsageError(
            f"--mesh={spec!r} is not a mesh shape", "write it like data=2,fsdp=4"
        ) from e


def format_matrix(matrix: np.ndarray, rows: list[str], cols: list[str], width: int = 28) -> str:
    clip = lambda s: s if len(s) <= width else s[: width - 1] + "…"  # noqa: E731
    lines = [" " * width + " | " + " ".join(f"{clip(c)[:10]:>10}" for c in cols)]
    lines += [
        f"{clip(r):<{width}} | " + " ".join(f"{v:10.4f}" for v in row)
        for r, row in zip(rows, matrix)
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m unime_jax.embed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="HF checkpoint directory (or hub id, with network)"
    )
    parser.add_argument("--text", action="append", default=[], help="a sentence (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="an image path (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--mesh", help="mesh shape, e.g. data=2,fsdp=4 (default: all devices on fsdp)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print the matrix as JSON")
    args = parser.parse_args(argv)
    if not args.text and not args.image:
        parser.error("give at least one --text or --image")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    return run_main(lambda: embed(args))


def embed(args) -> int:
    try:
        mesh = sharding.make_mesh(parse_mesh(args.mesh))
    except ValueError as e:
        raise UsageError(
            f"--mesh={args.mesh!r}: {e}", "give axes whose sizes multiply to the device count"
        ) from e
    embedder = Embedder.from_pretrained(
        args.model, mesh=mesh, dtype=args.dtype, batch_size=args.batch_size
    )
    text_emb = embedder.embed_texts(args.text) if args.text else None
    image_emb = embedder.embed_images(args.image) if args.image else None
    if text_emb is not None and image_emb is not None:
        rows, cols, matrix = args.text, args.image, similarity(text_emb, image_emb)
    else:
        names = args.text or args.image
        emb = text_emb if text_emb is not None else image_emb
        rows, cols, matrix = names, names, similarity(emb, emb)
    if args.json:
        json.dump(
            {"rows": rows, "columns": cols, "similarity": matrix.round(6).tolist()},
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print(format_matrix(matrix, rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
