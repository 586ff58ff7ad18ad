"""Which images fit a preset's sequence length: image tokens per image, and the share of image
sizes a side of ``query_length`` tokens can hold next to ``--text-tokens`` of instruction.

Image sizes: the real COCO photos of ``../shared/data/coco_mini`` when present (MMEB's images
are mostly COCO/VOC/web photos of similar sizes), plus a sweep of common sizes. For each paper
preset it prints the tokens of one image at the preset's ``image_size`` (every image is resized
to that square first, as in VLM2Vec / UniME) and, for comparison, at the original sizes
(``--config.image_size=0``). Needs only the bundled configs: no weights, no TPU.

    .venv/bin/python benchmarks/preset_coverage.py [--text-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image  # noqa: E402

from configs import stage2  # noqa: E402
from unime_jax import families  # noqa: E402
from unime_jax.preprocess import anyres  # noqa: E402

COCO_MINI = REPO_ROOT.parent / "shared" / "data" / "coco_mini" / "images"
SWEEP = [(480, 640), (640, 480), (427, 640), (640, 427), (375, 500), (500, 375), (512, 512),
         (720, 1280), (1080, 1920), (1024, 768), (300, 300), (224, 224), (336, 336), (2048, 1536)]  # fmt: skip


def sizes() -> tuple[str, list[tuple[int, int]]]:
    if COCO_MINI.is_dir():
        found = []
        for path in sorted(COCO_MINI.glob("*.jpg")):
            with Image.open(path) as img:
                found.append((img.height, img.width))
        return f"{len(found)} coco_mini photos + {len(SWEEP)} common sizes", found + SWEEP
    return f"{len(SWEEP)} common sizes (coco_mini not found)", SWEEP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-tokens", type=int, default=64)
    args = parser.parse_args()
    label, hw = sizes()
    print(f"image sizes: {label}; {args.text_tokens} instruction tokens per side")
    print(f"{'preset':<22}{'length':>7}{'image_size':>11}{'tokens/image':>22}{'fit':>8}")
    for preset in ("llava_onevision_7b", "llava_next_7b"):
        cfg = stage2.get_config(preset)
        hf = json.loads(
            (REPO_ROOT / "configs" / "models" / f"{cfg.reference_model}.json").read_text()
        )
        spec = families.for_config(hf).anyres_spec(hf)
        budget = cfg.query_length - args.text_tokens
        for image_size in (cfg.image_size, 0):
            shapes = [(image_size, image_size)] * len(hw) if image_size else hw
            tokens = [anyres.num_image_tokens(s, spec) for s in shapes]
            fit = sum(t <= budget for t in tokens) / len(tokens)
            span = f"{min(tokens)}-{max(tokens)}" if min(tokens) != max(tokens) else str(tokens[0])
            size = f"{image_size} px" if image_size else "original"
            print(f"{preset:<22}{cfg.query_length:>7}{size:>11}{span:>22}{fit:>8.0%}")


if __name__ == "__main__":
    main()
