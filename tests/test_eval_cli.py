"""The evaluation CLI end to end on small generated files (demo model), its error messages, the
cache across runs, and a smoke run on the real coco_mini photos (skipped when absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from unime_jax.eval import __main__ as cli
from unime_jax.eval.tasks import EvalError, load_tasks

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eval.py"
COCO_MINI = Path(__file__).parents[1].parent / "shared/data/coco_mini"


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    """Four small images of different sizes and formats, and a file of every task kind."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "c.png", "d.jpg"]):
        Image.new("RGB", (40 + 24 * i, 30 + 10 * i), (60 * i, 200 - 50 * i, 90)).save(imgs / name)
    write_json(
        tmp_path / "coco.json",
        {
            "images": [
                {"id": i, "file_name": n} for i, n in enumerate(["a.jpg", "b.png", "c.png"])
            ],
            "annotations": [
                {"image_id": i, "id": 10 * i + j, "caption": f"a photo number {i}, take {j}"}
                for i in range(3)
                for j in range(2)
            ],
        },
    )
    write_jsonl(
        tmp_path / "urban1k.jsonl",
        [
            {"image": n, "caption": f"a long description of {n}"}
            for n in ["a.jpg", "c.png", "d.jpg"]
        ],
    )
    (tmp_path / "sc").mkdir()
    for split in ("replace_obj", "swap_att"):
        write_json(
            tmp_path / "sc" / f"{split}.json",
            {
                "0": {"filename": "a.jpg", "caption": "a red cup", "negative_caption": "a red dog"},
                "1": {"filename": "b.png", "caption": "big sky", "negative_caption": "sky big"},
            },
        )
    (tmp_path / "mmeb").mkdir()
    q = "<|image_1|> Represent the given image for classification"
    write_jsonl(
        tmp_path / "mmeb" / "ImageNet-1K.jsonl",
        [
            {"qry_text": q, "qry_img_path": "a.jpg", "tgt_text": ["cup", "dog", "car"]},
            {"qry_text": q, "qry_img_path": "b.png", "tgt_text": ["sky", "cup", "car"]},
        ],
    )
    target = "<|image_1|> Represent the given image"
    write_jsonl(
        tmp_path / "mmeb" / "MSCOCO_t2i.jsonl",
        [
            {
                "qry_text": "Find me an everyday image that matches the caption: a cup",
                "qry_img_path": "",
                "tgt_text": [target, target],
                "tgt_img_path": ["c.png", "d.jpg"],
            }
        ],
    )
    return tmp_path


def argv(data, workdir, *extra):
    return [
        "unime_jax.eval",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        "--config.model=demo",
        "--config.tasks=coco,urban1k,sugarcrepe,mmeb",
        f"--config.coco.annotations={data / 'coco.json'}",
        f"--config.coco.images={data / 'imgs'}",
        f"--config.urban1k.annotations={data / 'urban1k.jsonl'}",
        f"--config.urban1k.images={data / 'imgs'}",
        f"--config.sugarcrepe.directory={data / 'sc'}",
        f"--config.sugarcrepe.images={data / 'imgs'}",
        "--config.sugarcrepe.splits=replace_obj,swap_att",
        f"--config.mmeb.directory={data / 'mmeb'}",
        f"--config.mmeb.images={data / 'imgs'}",
        f"--config.cache_dir={data / 'cache'}",
        "--config.progress=False",
        "--config.plot_max_k=5",
        *extra,
    ]


def percentages(d):
    return [v for v in d.values() if isinstance(v, float)]


def test_end_to_end_writes_the_report_and_reruns_from_the_cache(data, capsys):
    out = data / "out"
    assert cli.main(argv(data, out)) == 0
    report = json.loads((out / "report.json").read_text())
    tasks = report["tasks"]
    assert list(tasks) == ["coco", "urban1k", "sugarcrepe", "mmeb"]
    assert tasks["coco"]["metrics"]["num_captions"] == 6
    assert tasks["urban1k"]["metrics"]["num_images"] == 3
    assert tasks["sugarcrepe"]["metrics"]["num_items"] == {"replace_obj": 2, "swap_att": 2}
    assert tasks["mmeb"]["metrics"]["num_rows"] == {"ImageNet-1K": 2, "MSCOCO_t2i": 1}
    for task in tasks.values():
        m = task["metrics"]
        values = percentages(m) + percentages(m.get("per_dataset", {}))
        assert values and all(0 <= v <= 100 for v in values)
        assert task["cache"]["misses"] > 0 and task["plots"]
        for name in task["plots"]:
            assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert len(tasks["coco"]["recall_curve"]["text→image"]) == 3  # capped at the 3 images
    md = (out / "report.md").read_text()
    assert "## coco — retrieval (3 images, 6 captions)" in md
    assert "| Replace | " in md and "80.50" in md  # the paper's UniME OneVision-7B figure
    assert "![coco_similarity](coco_similarity.png)" in md
    assert "coco: t2i_R@1 " in capsys.readouterr().out  # the headline line per task

    # rerun: everything from the cache, same numbers
    assert cli.main(argv(data, data / "out2")) == 0
    again = json.loads((data / "out2" / "report.json").read_text())
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] > 0
    assert {n: t["metrics"] for n, t in again["tasks"].items()} == {
        n: t["metrics"] for n, t in tasks.items()
    }


def test_data_problems_are_reported_with_file_and_row(data, capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_encoder", lambda *a: pytest.fail("model built on bad data"))
    coco = json.loads((data / "coco.json").read_text())
    coco["images"][1]["file_name"] = "missing.jpg"
    write_json(data / "coco.json", coco)
    (data / "urban1k.jsonl").write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": oops\n')
    write_json(
        data / "sc" / "swap_att.json",
        {"7": {"filename": "../coco.json", "caption": "x", "negative_caption": "y"}},
    )
    assert cli.main(argv(data, data / "out")) == 1
    err = capsys.readouterr().err
    assert f"task 'coco' (retrieval): {data / 'coco.json'}: 1 problem(s)" in err
    assert "images[1] (id 1): image file" in err and "missing.jpg' does not exist" in err
    assert f"{data / 'urban1k.jsonl'}: 1 problem(s)" in err and "line 2: malformed JSON" in err
    assert "swap_att.json" in err and "id 7: image path '../coco.json' leaves the image root" in err
    assert not (data / "out" / "report.json").exists()


def test_config_problems(data, capsys):
    assert cli.main(argv(data, data / "o", "--config.tasks=coco,flickr,nope")) == 1
    err = capsys.readouterr().err
    assert (
        "task 'flickr' (retrieval): --config.flickr.annotations and --config.flickr.images "
        "not set" in err
    )
    assert "task 'nope': no such section" in err
    assert cli.main(argv(data, data / "o", "--config.no_such_option=1")) == 2
    assert "no_such_option" in capsys.readouterr().err
    assert cli.main(["unime_jax.eval", f"--config={CONFIG}"]) == 2
    assert "--workdir are required" in capsys.readouterr().err
    run_dir = data / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    assert cli.main(argv(data, data / "o", f"--config.model={run_dir}")) == 1
    assert "is a training run directory without a merged checkpoint" in capsys.readouterr().err


def test_coco_mini_preset_explains_missing_data(tmp_path):
    cfg = eval_config.get_config("coco_mini")
    cfg.coco.annotations = str(tmp_path / "gone" / "captions_val2017.json")
    with pytest.raises(EvalError, match=r"(?s)no such file.*the coco_mini preset reads"):
        load_tasks(cfg)


def test_undecodable_image_names_the_task_and_file(data, capsys):
    (data / "imgs" / "b.png").write_bytes(b"not a png")
    assert cli.main(argv(data, data / "out", "--config.tasks=coco")) == 1
    err = capsys.readouterr().err
    assert "task 'coco' (retrieval) failed" in err and "b.png cannot be decoded" in err


class FakeEmbedder:
    batch_size = 4

    def _emb(self, n):
        return np.tile(np.eye(1, 8), (n, 1))

    def embed_texts(self, texts):
        return self._emb(len(texts))

    def embed_images(self, images):
        return self._emb(len(images))

    def embed_instructions(self, texts, images=None):
        return self._emb(len(texts))


def test_cached_checkpoint_rerun_never_loads_the_weights(data, monkeypatch):
    from safetensors.numpy import save_file

    from unime_jax.embedder import Embedder

    run_dir = data / "run"  # a training run: evaluated from its merged HF checkpoint
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = run_dir / "merged"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llava_onevision"}')
    save_file({"w": np.zeros(2, np.float32)}, str(ckpt / "model.safetensors"))
    loads = []

    def from_pretrained(cls, path, **kwargs):
        loads.append(path)
        return FakeEmbedder()

    monkeypatch.setattr(Embedder, "from_pretrained", classmethod(from_pretrained))
    args = argv(data, data / "out", f"--config.model={run_dir}", "--config.tasks=coco,sugarcrepe")
    assert cli.main(args) == 0 and loads == [ckpt]
    assert cli.main(args) == 0 and len(loads) == 1
    report = json.loads((data / "out" / "report.json").read_text())
    assert report["model"]["kind"] == "checkpoint" and report["cache"]["misses"] == 0
    # a constant encoder ties everywhere; ties count as wrong
    assert report["tasks"]["coco"]["metrics"]["t2i_R@1"] == 0.0
    (ckpt / "config.json").write_text('{"model_type": "llava_onevision", "x": 1}')
    assert cli.main(args) == 0 and len(loads) == 2  # a changed checkpoint is a new model


@pytest.mark.skipif(
    not (COCO_MINI / "captions_val2017.json").is_file(),
    reason=f"coco_mini not found at {COCO_MINI}; real-data check skipped",
)
def test_coco_mini_real_photos_through_the_cli(tmp_path, capsys):
    """Real JPEGs (odd sizes) and the real annotation / SugarCrepe files, through the CLI with
    the random-init demo model: a smoke test of the pipeline, so numbers sit near chance."""
    out = tmp_path / "out"
    args = [
        "unime_jax.eval",
        f"--config={CONFIG}:coco_mini",
        f"--workdir={out}",
        "--config.coco.max_images=20",
        "--config.sugarcrepe.max_items=6",
        "--config.cache_dir=",
        "--config.progress=False",
    ]
    assert cli.main(args) == 0
    tasks = json.loads((out / "report.json").read_text())["tasks"]
    coco, sc = tasks["coco"]["metrics"], tasks["sugarcrepe"]["metrics"]
    print(f"\ncoco_mini via CLI (demo model): {capsys.readouterr().out}")
    assert coco["num_images"] == 20 and coco["num_captions"] == 100
    assert sum(sc["num_items"].values()) == 42
    assert all(0 <= v <= 100 for v in percentages(coco) + percentages(sc))
    assert tasks["coco"]["source"].endswith("captions_val2017.json")
    assert all((out / p).stat().st_size > 0 for t in tasks.values() for p in t["plots"])
