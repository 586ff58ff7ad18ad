"""The evaluation CLI end to end on small generated benchmarks, read only through the TFDS
builders (built by the CLI from each task's manual_dir into a temporary data dir): the demo
model's report, known answers with an oracle encoder, the cache across runs, its user errors
(error: / Fix:, exit 2 for flags and config, 1 for data), and a smoke run on the real coco_mini
photos (skipped when absent)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from configs.eval import COCO_MINI
from tests.eval_fixtures import oracle_encoder
from unime_jax.errors import DataError
from unime_jax.eval import __main__ as cli
from unime_jax.eval.metrics import SUGARCREPE_SPLITS
from unime_jax.eval.tasks import load_tasks

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "eval.py"


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data(tmp_path):
    """Four small images of different sizes and formats, and a manual dir per dataset in the
    layout its builder reads (the images linked in): coco_captions/val2017, long_caption,
    sugarcrepe/val2017 (all 7 split files) and mmeb_eval."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, name in enumerate(["a.jpg", "b.png", "c.png", "d.jpg"]):
        Image.new("RGB", (40 + 24 * i, 30 + 10 * i), (60 * i, 200 - 50 * i, 90)).save(imgs / name)
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").symlink_to(imgs)
    write_json(
        coco / "annotations" / "captions_val2017.json",
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
    urban = tmp_path / "urban1k"
    urban.mkdir()
    (urban / "images").symlink_to(imgs)
    write_jsonl(
        urban / "captions.jsonl",
        [
            {"image": n, "caption": f"a long description of {n}"}
            for n in ["a.jpg", "c.png", "d.jpg"]
        ],
    )
    sc = tmp_path / "sugarcrepe"
    sc.mkdir()
    (sc / "val2017").symlink_to(imgs)
    for split in SUGARCREPE_SPLITS:
        write_json(
            sc / f"{split}.json",
            {
                "0": {"filename": "a.jpg", "caption": "a red cup", "negative_caption": "a red dog"},
                "1": {"filename": "b.png", "caption": "big sky", "negative_caption": "sky big"},
            },
        )
    mmeb = tmp_path / "mmeb"
    mmeb.mkdir()
    (mmeb / "imgs").symlink_to(imgs)
    q = "<|image_1|> Represent the given image for classification"
    write_jsonl(
        mmeb / "ImageNet-1K.jsonl",
        [
            {"qry_text": q, "qry_img_path": "imgs/a.jpg", "tgt_text": ["cup", "dog", "car"]},
            {"qry_text": q, "qry_img_path": "imgs/b.png", "tgt_text": ["sky", "cup", "car"]},
        ],
    )
    target = "<|image_1|> Represent the given image"
    write_jsonl(
        mmeb / "MSCOCO_t2i.jsonl",
        [
            {
                "qry_text": "Find me an everyday image that matches the caption: a cup",
                "qry_img_path": "",
                "tgt_text": [target, target],
                "tgt_img_path": ["imgs/c.png", "imgs/d.jpg"],
            }
        ],
    )
    return tmp_path


def argv(data, workdir, *extra, manual=True):
    """The CLI's arguments: the demo model, four tasks, the data dir ``data/tfds`` and (with
    ``manual``) each task's manual dir, so the first run builds the datasets."""
    manual_dirs = [
        f"--config.{task}.manual_dir={data / folder}"
        for task, folder in (
            ("coco", "coco"),
            ("urban1k", "urban1k"),
            ("sugarcrepe", "sugarcrepe"),
            ("mmeb", "mmeb"),
        )
    ]
    return [
        "unime_jax.eval",
        f"--config={CONFIG}",
        f"--workdir={workdir}",
        "--config.model=demo",
        "--config.tasks=coco,urban1k,sugarcrepe,mmeb",
        "--config.coco.dataset=coco_captions/val2017",
        f"--config.data_dir={data / 'tfds'}",
        *(manual_dirs if manual else []),
        "--config.sugarcrepe.splits=replace_obj,swap_att",
        f"--config.cache_dir={data / 'cache'}",
        "--config.progress=False",
        "--config.plot_max_k=5",
        *extra,
    ]


def percentages(d):
    return [v for v in d.values() if isinstance(v, float)]


def user_error(capsys, status, code):
    """stderr of a user error: exit ``status``, ``error:`` then ``Fix:``, no traceback."""
    err = capsys.readouterr().err
    assert code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.startswith("error: ") or "\nerror: " in err, err[-3000:]
    assert "\nFix: " in err, err[-3000:]
    return err


def test_end_to_end_builds_the_datasets_and_reruns_from_the_cache(data, capsys):
    out = data / "out"
    assert cli.main(argv(data, out)) == 0
    for dataset in ("coco_captions/val2017", "long_caption/urban1k", "sugarcrepe/val2017"):
        assert (data / "tfds" / dataset / "1.0.0" / "dataset_info.json").is_file(), dataset
    assert {p.name for p in (data / "tfds" / "mmeb_eval").iterdir()} >= {"rows", "images"}
    report = json.loads((out / "report.json").read_text())
    tasks = report["tasks"]
    assert list(tasks) == ["coco", "urban1k", "sugarcrepe", "mmeb"]
    assert tasks["coco"]["metrics"]["num_captions"] == 6
    assert tasks["coco"]["source"].startswith(f"coco_captions/val2017/1.0.0 [test] in {data}")
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

    # rerun from the prepared datasets (no manual dirs now): everything from the cache
    assert cli.main(argv(data, data / "out2", manual=False)) == 0
    again = json.loads((data / "out2" / "report.json").read_text())
    assert again["cache"]["misses"] == 0 and again["cache"]["hits"] > 0
    assert {n: t["metrics"] for n, t in again["tasks"].items()} == {
        n: t["metrics"] for n, t in tasks.items()
    }


def test_known_answers_through_the_datasets(data):
    """An encoder that knows the answers scores exactly 100 on what the builders give back:
    the images (bytes) and captions are joined as in the source files."""
    cfg = eval_config.get_config()
    cfg.tasks = "coco,urban1k,sugarcrepe"
    cfg.coco.dataset = "coco_captions/val2017"
    cfg.data_dir = str(data / "tfds")
    cfg.cache_dir = ""
    cfg.plots = False
    cfg.progress = False
    for task in ("coco", "urban1k", "sugarcrepe"):
        cfg[task].manual_dir = str(data / task)
    cfg.sugarcrepe.dataset = "sugarcrepe/val2017:swap_att"  # one split, named in the reference
    coco, urban, sc = (t.data for t in load_tasks(cfg))
    assert all(isinstance(p, bytes) for p in coco.image_paths)
    assert coco.image_paths == [(data / "imgs" / n).read_bytes() for n in ("a.jpg", "b.png", "c.png")]  # fmt: skip
    assert list(sc) == ["swap_att"] and sc["swap_att"][0].caption == "a red cup"
    cfg.tasks = "coco,sugarcrepe"
    result = cli.run(cfg, data / "out", encoder=oracle_encoder(coco, sc))
    metrics = result["tasks"]["coco"]["metrics"]
    assert metrics["t2i_R@1"] == metrics["i2t_R@1"] == 100.0
    assert result["tasks"]["sugarcrepe"]["metrics"]["swap_att"] == 100.0
    cfg.tasks = "urban1k"
    urban_result = cli.run(cfg, data / "out", encoder=oracle_encoder(urban))["tasks"]["urban1k"]
    assert urban_result["metrics"]["t2i_R@1"] == 100.0


def test_unprepared_datasets_say_how_to_build_them(data, capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_encoder", lambda *a: pytest.fail("model built without data"))
    code = cli.main(argv(data, data / "out", "--config.tasks=coco,mmeb", manual=False))
    err = user_error(capsys, 1, code)
    tfds_dir = data / "tfds"
    assert "2 tasks cannot be read" in err  # every task's problem at once
    assert (
        f"task 'coco' (retrieval): coco_captions/val2017/1.0.0 is not prepared in {tfds_dir}" in err
    )
    assert (
        f"python -m unime_jax.datasets build coco_captions --config val2017 --manual_dir DIR "
        f"--data_dir {tfds_dir}" in err
    )
    assert f"build mmeb_eval --manual_dir DIR --data_dir {tfds_dir}" in err  # both configs
    assert "--config.coco.manual_dir=DIR" in err
    assert not (data / "out" / "report.json").exists()
    # one task: its own error and Fix lines
    code = cli.main(argv(data, data / "out", "--config.tasks=urban1k", manual=False))
    err = user_error(capsys, 1, code)
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: task 'urban1k' (long_caption): long_caption/urban1k/")
    assert lines[1].startswith("Fix: build it: python -m unime_jax.datasets build long_caption")


def test_data_problems_stop_the_build_with_file_and_row(data, capsys, monkeypatch):
    monkeypatch.setattr(cli, "build_encoder", lambda *a: pytest.fail("model built on bad data"))
    path = data / "coco" / "annotations" / "captions_val2017.json"
    coco = json.loads(path.read_text())
    coco["images"][1]["file_name"] = "missing.jpg"
    write_json(path, coco)
    (data / "urban1k" / "captions.jsonl").write_text(
        '{"image": "a.jpg", "caption": "ok"}\n{"image": oops\n'
    )
    write_json(
        data / "sugarcrepe" / "swap_att.json",
        {"7": {"filename": "../coco.json", "caption": "x", "negative_caption": "y"}},
    )
    err = user_error(capsys, 1, cli.main(argv(data, data / "out")))
    assert f"task 'coco' (retrieval): building coco_captions/val2017 from {data / 'coco'}" in err
    assert f"{path}: 1 problem(s)" in err
    assert "images[1] (id 1): image file" in err and "missing.jpg' does not exist" in err
    assert f"{data / 'urban1k' / 'captions.jsonl'}: 1 problem(s)" in err
    assert "line 2: malformed JSON" in err
    assert "swap_att.json" in err and "id 7: image path '../coco.json' leaves the image root" in err
    assert not (data / "out" / "report.json").exists()
    assert not (data / "tfds" / "coco_captions" / "val2017" / "1.0.0").exists()  # nothing kept


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--config.coco.dataset=coco_captionz/val2017"], ["--config.coco.dataset=", "NAME"]),
        (["--config.coco.dataset=coco_captions/val2017:a:b"], ["does not name a dataset"]),
        (["--config.coco.dataset=sugarcrepe/val2017"], ["a retrieval task cannot read sugarcrepe"]),
        (["--config.coco.dataset=coco_captions/val2018"], ["has no config 'val2018'"]),
        (["--config.mmeb.dataset=mmeb_eval/rows"], ["MMEB-eval is read whole"]),
        (["--config.coco.dataset="], ["--config.coco.dataset is empty"]),
        (["--config.sugarcrepe.splits=swap_everything"], ["unknown ['swap_everything']"]),
        (["--config.tasks=coco,nope"], ["task 'nope': no such section"]),
        (["--config.no_such_option=1"], ["unknown config key", "no_such_option"]),
        (["--config.coco.max_images=many"], ["--config.coco.max_images"]),
        (["--config.reference=nobody"], ["--config.reference: unknown ['nobody']"]),
    ],
)
def test_config_problems_exit_2(data, capsys, monkeypatch, args, needles):
    monkeypatch.setattr(cli, "build_encoder", lambda *a: pytest.fail("model built on bad config"))
    err = user_error(capsys, 2, cli.main(argv(data, data / "o", *args, manual=False)))
    for needle in needles:
        assert needle in err, (needle, err)


def test_usage_and_model_problems(data, capsys):
    err = user_error(capsys, 2, cli.main(["unime_jax.eval", f"--config={CONFIG}"]))
    assert "--workdir are required" in err
    err = user_error(capsys, 2, cli.main(["unime_jax.eval", "--config=configs/nope.py", "--workdir=x"]))  # fmt: skip
    assert "configs/nope.py" in err
    err = user_error(capsys, 2, cli.main(argv(data, data / "o", "--config.dtype=int3")))
    assert "--config.dtype='int3'" in err
    run_dir = data / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    err = user_error(capsys, 1, cli.main(argv(data, data / "o", f"--config.model={run_dir}")))
    assert "is a training run directory without a merged checkpoint" in err
    assert "export_hf" in err


def test_coco_mini_preset_explains_missing_data(tmp_path, capsys):
    cfg = eval_config.get_config("coco_mini")
    assert (cfg.coco.dataset, cfg.sugarcrepe.dataset) == ("coco_captions/mini", "sugarcrepe/mini")
    assert cfg.coco.manual_dir == cfg.sugarcrepe.manual_dir == str(COCO_MINI)
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.coco.manual_dir = cfg.sugarcrepe.manual_dir = str(tmp_path / "gone")
    with pytest.raises(DataError, match=r"(?s)manual_dir=.*gone.*no such directory") as e:
        load_tasks(cfg)
    assert "the coco_mini preset builds its datasets from" in e.value.fix
    # the same through the CLI: both tasks, one error: / Fix: report
    args = [
        "unime_jax.eval",
        f"--config={CONFIG}:coco_mini",
        f"--workdir={tmp_path / 'out'}",
        f"--config.data_dir={tmp_path / 'tfds'}",
        f"--config.coco.manual_dir={tmp_path / 'gone'}",
        f"--config.sugarcrepe.manual_dir={tmp_path / 'gone'}",
    ]
    err = user_error(capsys, 1, cli.main(args))
    assert "2 tasks cannot be read" in err and "the coco_mini preset builds" in err


def test_undecodable_image_stops_the_build_naming_the_file(data, capsys):
    (data / "imgs" / "b.png").write_bytes(b"not a png")
    err = user_error(capsys, 1, cli.main(argv(data, data / "out", "--config.tasks=coco")))
    assert "task 'coco' (retrieval): image b.png: image " in err
    assert "b.png cannot be decoded" in err
    assert "replace the file with a readable copy" in err
    assert not (data / "tfds" / "coco_captions" / "val2017" / "1.0.0").exists()


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
    """The preset as users run it: the first run builds coco_captions/mini and sugarcrepe/mini
    from ../shared/data/coco_mini, then evaluates the random-init demo model on the real JPEGs
    (odd sizes): a smoke test of the pipeline, so numbers sit near chance."""
    out = tmp_path / "out"
    args = [
        "unime_jax.eval",
        f"--config={CONFIG}:coco_mini",
        f"--workdir={out}",
        f"--config.data_dir={tmp_path / 'tfds'}",
        "--config.coco.max_images=20",
        "--config.sugarcrepe.max_items=6",
        "--config.cache_dir=",
        "--config.progress=False",
    ]
    assert cli.main(args) == 0
    assert (tmp_path / "tfds" / "coco_captions" / "mini" / "1.0.0").is_dir()
    assert (tmp_path / "tfds" / "sugarcrepe" / "mini" / "1.0.0").is_dir()
    tasks = json.loads((out / "report.json").read_text())["tasks"]
    coco, sc = tasks["coco"]["metrics"], tasks["sugarcrepe"]["metrics"]
    print(f"\ncoco_mini via CLI (demo model): {capsys.readouterr().out}")
    assert coco["num_images"] == 20 and coco["num_captions"] == 100
    assert sum(sc["num_items"].values()) == 42
    assert all(0 <= v <= 100 for v in percentages(coco) + percentages(sc))
    assert tasks["coco"]["source"].startswith("coco_captions/mini/1.0.0 [test] in ")
    assert tasks["coco"]["source"].endswith(f"(built from {COCO_MINI / 'captions_val2017.json'})")
    assert all((out / p).stat().st_size > 0 for t in tasks.values() for p in t["plots"])
