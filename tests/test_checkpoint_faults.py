"""Damaged checkpoints never poison a run: the newest usable step is found (damaged ones are
reported and moved aside), the run resumes and ends exactly where an undamaged run ends; with no
usable step the run stops with a clear error; a non-finite state is never saved."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.test_train import tiny_cfg
from unime_jax import checkpoint, sharding, train
from unime_jax.errors import DataError, UsageError

STEPS = 6


def cfg():
    return tiny_cfg(num_steps=STEPS, checkpoint_every=2, keep_checkpoints=3, export_merged=False)


def digest(workdir: Path) -> dict:
    return json.loads((workdir / "final_state_digest.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An undamaged run: checkpoints 2, 4 and 6 and its final digest."""
    workdir = tmp_path_factory.mktemp("straight")
    train.run(cfg(), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    return workdir


def largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def overwrite_values(step_dir: Path) -> None:
    path = largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
    path.write_bytes(bytes(data))


def break_manifest(step_dir: Path) -> None:
    for manifest in (step_dir / "state").rglob("manifest.ocdbt"):
        manifest.write_bytes(b"not a manifest" * 10)


def empty_directory(step_dir: Path) -> None:
    for child in step_dir.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def change_a_digest_leaf(step_dir: Path) -> None:
    """Values that read back fine but are not what was saved (the digest's view of it)."""
    path = step_dir / "digest" / "metadata"
    stored = json.loads(path.read_text())
    stored["leaves"][0] ^= 1
    path.write_text(json.dumps(stored))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (overwrite_values, ""),  # compressed chunks: unreadable or a digest mismatch
        (break_manifest, "cannot be read"),
        (empty_directory, "cannot be read"),
        (change_a_digest_leaf, "does not match its digest"),
    ],
)
def test_newest_damaged_falls_back_and_ends_exactly(straight, tmp_path, damage, reason, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    damage(workdir / "checkpoints" / "6")
    (workdir / "final_state_digest.json").unlink()
    train.run(cfg(), str(workdir))  # resumes from step 4, trains steps 5 and 6 again
    assert digest(workdir) == digest(straight)
    assert f"checkpoint step 6 ({workdir / 'checkpoints' / '6'}) {reason}" in caplog.text
    assert "resuming from step 4" in caplog.text
    moved = list((workdir / "checkpoints.damaged").iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6-")  # kept for inspection


def test_no_usable_checkpoint_is_an_error(straight, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    for step in ("2", "4", "6"):
        break_manifest(workdir / "checkpoints" / step)
    with pytest.raises(DataError, match=r"no usable checkpoint in .*step 6.*step 4.*step 2") as e:
        train.run(cfg(), str(workdir))
    assert "delete the damaged step directories" in e.value.fix
    assert (workdir / "checkpoints" / "6").is_dir()  # nothing moved or deleted on failure


@pytest.mark.parametrize(
    "change, said",
    [
        (dict(lora_rank=4), "lora_rank=0 (now 4)"),
        (dict(grad_clip=0.0), "clipping=True (now False)"),
        (dict(dtype="bfloat16"), "dtype='float32' (now 'bfloat16')"),
    ],
)
def test_resuming_under_another_train_state_is_refused(straight, tmp_path, change, said):
    """Other LoRA / clipping / dtype values cannot restore these checkpoints: a usage error that
    says so, not "damaged", and nothing moved, deleted or rewritten."""
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    config = (workdir / "config.json").read_bytes()
    other = cfg()
    other.update(change)
    with pytest.raises(UsageError, match=re.escape(f"holds checkpoints of a run with {said}")):
        train.run(other, str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4", "6"]
    assert not (workdir / "checkpoints.damaged").exists()
    assert (workdir / "config.json").read_bytes() == config
    train.run(cfg(), str(workdir))  # the same values still resume


def test_non_finite_state_is_never_saved(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    good = {"w": jnp.ones((4, 3)), "step": jnp.zeros((), jnp.int32)}
    ckpt.save(1, good, {"pipeline": 0})
    ckpt.wait()
    with pytest.raises(DataError, match="not finite at step 2"):
        ckpt.save(2, {"w": good["w"].at[0, 0].set(jnp.nan), "step": good["step"]}, {})
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]


def test_digest_is_exact_and_position_sensitive():
    x = jnp.arange(12.0).reshape(3, 4)
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    for spec in (P(), P("data"), P(None, "fsdp"), P("fsdp", "data")):  # the same on any layout
        placed = jax.device_put(jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, spec))
        assert checkpoint.digest_list(placed) == checkpoint.digest_list(
            np.arange(32.0).reshape(8, 4)
        )
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert checkpoint.digest_list(swapped) != checkpoint.digest_list(x)
    assert checkpoint.digest_list(x.astype(jnp.bfloat16)) != checkpoint.digest_list(x)
