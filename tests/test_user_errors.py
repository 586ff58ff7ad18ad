"""Every entry point fails the same way on user error: ``error: <what, where>`` and ``Fix: ...``,
exit status 2 (flags, config) or 1 (data, files), no traceback, nothing good overwritten; bad
data is reported row by row or stops the run with the reason, never loops or trains silently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import unime_jax.datasets as uds
from tests.test_model_parity import photo
from unime_jax import teacher, train
from unime_jax.data.sentences import open_sentences
from unime_jax.errors import DataError, UsageError

REPO = Path(__file__).resolve().parents[1]


def cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return proc.returncode, proc.stderr


def assert_user_error(code, stderr, status, *needles):
    assert code == status, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = stderr.strip().splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert lines[error + 1].startswith("Fix: "), lines[error:]
    for needle in needles:
        assert needle in stderr, (needle, stderr[-2000:])


MAIN = ["unime_jax.main", "--config=configs/stage2.py:demo"]


@pytest.mark.parametrize(
    "args, status, needles",
    [
        (["--config.nonexistent=1"], 2, ["unknown config key 'nonexistent'"]),
        (["--config.batch_size=abc"], 2, ["--config.batch_size=abc"]),
        (["--config.batch_size=-4"], 2, ["--config.batch_size=-4 is out of range"]),
        (["--config.lora_dropout=1.5"], 2, ["--config.lora_dropout=1.5"]),
        (["--config.model=/nowhere/model"], 1, ["/nowhere/model does not exist"]),
    ],
    ids=["unknown-key", "bad-value", "negative-batch", "dropout-range", "missing-model"],
)
def test_main_user_errors(tmp_path, args, status, needles):
    code, err = cli(*MAIN, f"--workdir={tmp_path / 'run'}", *args)
    assert_user_error(code, err, status, *needles)


def test_main_missing_config_file(tmp_path):
    code, err = cli("unime_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert_user_error(code, err, 2, "configs/nope.py")


def test_embed_cli_errors(tmp_path):
    code, err = cli("unime_jax.embed", "--model", str(tmp_path / "none"), "--text", "a")
    assert_user_error(code, err, 1, "does not exist")
    code, err = cli("unime_jax.embed", "--model", str(tmp_path))
    assert_user_error(code, err, 2, "give at least one --text or --image")


# ---------------------------------------------------------------------------------------------
# building and reading datasets


def build_cli(manual, data_dir):
    return cli(
        "unime_jax.datasets", "build", "mmeb_train", "--config", "all",
        "--manual_dir", str(manual), "--data_dir", str(data_dir),
    )  # fmt: skip


def test_builder_reports_undecodable_lines_and_truncated_jpegs(tmp_path):
    root = tmp_path / "manual"
    root.mkdir()
    photo("coffee", (64, 48)).save(root / "good.jpg", quality=90)
    data = (root / "good.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 2])  # verify() passes, decoding fails
    row = {"qry": "<|image_1|> find it", "pos_text": "a cup", "pos_image_path": ""}
    lines = [json.dumps(row | {"qry_image_path": "good.jpg"}).encode()]
    lines.append(b'{"qry": "caf\xe9 \xff", "pos_text": "x"}')  # not UTF-8
    lines.append(json.dumps(row | {"qry_image_path": "cut.jpg"}).encode())
    (root / "rows.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, err = build_cli(root, tmp_path / "tfds")
    assert code == 0, err[-2000:]
    report = uds.mmeb_train.report(data_dir=tmp_path / "tfds")
    assert report["kept"] == 1
    assert report["bad_rows"] == {"malformed_row": [["rows", 1]], "corrupt_image": [["rows", 2]]}
    assert report["malformed"]["rows/1"].startswith("rows.jsonl line 2: not UTF-8")
    # A prepared dataset is never rebuilt over (only with --overwrite).
    shards = sorted((tmp_path / "tfds" / "mmeb_train" / "all").rglob("*.array_record*"))
    before = [p.read_bytes() for p in shards]
    (root / "rows.jsonl").write_bytes(lines[0] + b"\n")
    code, err = build_cli(root, tmp_path / "tfds")
    assert code == 0 and [p.read_bytes() for p in shards] == before


def test_truncated_shard_names_the_file(tmp_path):
    root = tmp_path / "manual"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "a.png")
    rows = [
        {
            "qry": f"q {i}",
            "qry_image_path": "",
            "pos_text": "<|image_1|>",
            "pos_image_path": "a.png",
        }
        for i in range(64)
    ]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    uds.prepare("mmeb_train", data_dir=tmp_path / "tfds", config="all", manual_dir=root)
    (shard,) = (tmp_path / "tfds" / "mmeb_train" / "all").rglob("*.array_record*")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match=shard.name) as e:
        list(uds.source("mmeb_train", "train", data_dir=tmp_path / "tfds", config="all"))
    assert "--overwrite" in e.value.fix


# ---------------------------------------------------------------------------------------------
# training data that cannot be used


def test_training_stops_when_every_image_is_gone(tmp_path, monkeypatch):
    from tests.test_train import tiny_cfg

    gone = [
        {"qry": "<|image_1|> find it", "qry_image": str(tmp_path / f"missing{i}.png"),
         "pos_text": "a cup"}
        for i in range(40)
    ]  # fmt: skip
    monkeypatch.setattr(train.stages.get(2), "source", lambda cfg: gone)
    cfg = tiny_cfg(max_bad_rows=32)
    with pytest.raises(DataError, match=r"32 rows in a row were unusable \({'missing_image': 32}"):
        train.run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir()
    )


class HashTeacher:
    name, dim = "hash-teacher", 8

    def encode(self, sentences, instruction=None):
        return np.stack([np.random.default_rng(len(s)).normal(size=8) for s in sentences])


def test_non_finite_teacher_rows_are_refused_or_skipped(tmp_path):
    """The precompute never writes a non-finite vector; a file damaged afterwards is caught at
    load: refused with the rows named, or (teacher_bad_rows=skip) those rows left out."""
    rows = [{"sent0": f"a red circle {i}", "sent1": f"a blue square {i}", "hard_neg": "a star"}
            for i in range(4)]  # fmt: skip
    teacher.write_nli_csv(tmp_path / "manual" / "nli.csv", rows)
    data_dir = tmp_path / "tfds"
    uds.prepare("nli_simcse", data_dir=data_dir, manual_dir=tmp_path / "manual")
    teacher.precompute(uds.nli_corpus(data_dir=data_dir), tmp_path / "t", teacher=HashTeacher())
    corpus = uds.source("nli_simcse", "train", data_dir=data_dir)
    checksum = uds.nli_simcse.recorded(data_dir=data_dir)["corpus_sha256"]
    vectors = np.load(tmp_path / "t" / "embeddings.npy", mmap_mode="r+")
    vectors[1] = np.nan  # row "0:sent1"
    vectors[5] = 0.0  # row "1:hard_neg"
    vectors.flush()
    del vectors
    with pytest.raises(
        DataError, match=r"2 teacher vector\(s\) .* rows \['0:sent1', '1:hard_neg'\]"
    ):
        open_sentences(corpus, checksum, tmp_path / "t")
    kept = open_sentences(corpus, checksum, tmp_path / "t", bad_rows="skip")
    assert len(kept) == 10
    assert {kept[i]["id"] for i in range(10)}.isdisjoint({"0:sent1", "1:hard_neg"})


def test_a_dataset_of_another_kind_is_a_usage_error(tmp_path):
    """Sentences named where image-text pairs are read (and the reverse) stop before a record
    is read, naming both kinds; not a KeyError deep in the pipeline."""
    from tests.test_train import tiny_cfg
    from unime_jax.stages import datasets

    with pytest.raises(UsageError, match="holds nli_simcse-style records, but mmeb_train-style"):
        train.run(tiny_cfg(train_data="shapes_world/nli"), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    pairs = datasets.builder_config(tiny_cfg(), uds.Ref("shapes_world", "pairs"))
    uds.prepare("shapes_world", config=pairs)
    with pytest.raises(UsageError, match="holds mmeb_train-style records, but nli_simcse-style"):
        uds.nli_simcse.recorded("shapes_world", config=pairs)
    with pytest.raises(UsageError, match="holds mmeb_train-style records"):
        uds.nli_corpus("shapes_world", config=pairs)
