"""Imports point one way: apps → training → families → (models, preprocess, weights) → base.

Checked on the source (AST), so a module that imports upwards fails here, not in a review.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "unime_jax"

# Package (or module) → the unime_jax packages it may import besides itself.
BASE = {"errors", "files", "sharding", "flops"}
ALLOWED = {
    "errors": set(),
    "files": set(),
    "sharding": {"errors"},
    "flops": {"models.config"},
    "models": BASE,
    "preprocess": BASE | {"models.inputs"},
    "weights": BASE | {"models.config"},
    "families": BASE | {"models", "preprocess", "weights"},
    "inference": BASE | {"families", "models", "preprocess", "weights"},
    "export": BASE | {"families", "models", "preprocess", "weights"},
}


def imports(path: Path) -> set[str]:
    """The unime_jax modules a file imports (relative to the package, dotted)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unime_jax"):
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            out.add(names[0] if node.module != "unime_jax" else names[1])
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("unime_jax")}
    return {m.removeprefix("unime_jax").lstrip(".") for m in out} - {""}


def owner(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_downwards(layer):
    files = sorted(ROOT.glob(f"{layer}/**/*.py")) or [ROOT / f"{layer}.py"]
    for path in files:
        for module in imports(path):
            if module.split(".")[0] == layer:
                continue
            ok = any(module == a or module.startswith(a + ".") for a in ALLOWED[layer])
            assert ok, f"{path.relative_to(ROOT)} imports unime_jax.{module} (layer {layer!r})"


def test_every_package_is_layered_or_an_app():
    apps = {"__init__", "main", "embed", "embedder", "train", "steps", "gradcache", "losses"}
    apps |= {"checkpoint", "train_log", "aot", "data", "stages", "demo", "eval", "teacher"}
    apps |= {"datasets"}  # TFDS builders and their readers (training and evaluation data)
    found = {owner(p) for p in ROOT.glob("**/*.py")}
    assert found <= set(ALLOWED) | apps, found - set(ALLOWED) - apps
