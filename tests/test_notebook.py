"""notebooks/unime_eval.ipynb runs top to bottom with the offline demo model (no downloads) in a
fresh kernel of this interpreter, and shows its similarity matrix, metrics and plots."""

import json
import re
import sys
from pathlib import Path

import pytest

import unime_jax.datasets as uds
from tests.eval_fixtures import oracle_encoder
from unime_jax.eval import evaluators as ev

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
kernelspec = pytest.importorskip("ipykernel.kernelspec")
KernelSpecManager = pytest.importorskip("jupyter_client.kernelspec").KernelSpecManager

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "unime_eval.ipynb"


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


@pytest.mark.slow  # a kernel, the demo model's compiles and two evaluations: ~45 s on 2 CPUs
def test_notebook_runs(tmp_path, monkeypatch):
    # A "python3" kernelspec for this interpreter, found before any user or system one.
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    kernelspec.install(kernel_name="python3", prefix=str(tmp_path / "jupyter"))
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] == sys.executable
    # The kernel inherits the environment: CPU, offline, and one device as on a plain machine
    # (not the fake devices of conftest.py).
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder lands here
    work = tmp_path / "cwd"
    work.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    client.execute()  # raises CellExecutionError (with the cell and traceback) if a cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    pngs = [out for out in outputs if "image/png" in out.get("data", {})]

    assert "JAX " in text and "on cpu" in text
    assert "embedding dim" in text and "texts (6, " in text
    # the metrics table: a "task metric value" row per number
    rows = re.findall(r"^(shapes\S*) +(\S+) +(\d+\.\d\d)$", text, re.MULTILINE)
    table = {(task, metric): float(value) for task, metric, value in rows}
    work_dir = next(tmp_path.glob("unime_eval_*"))
    report = json.loads((work_dir / "report" / "report.json").read_text())
    for key in [("shapes", f"{d}_R@{k}") for d in ("t2i", "i2t") for k in (1, 5, 10)] + [
        ("shapes_sugarcrepe", m) for m in ("replace_att", "swap_obj", "add_att", "replace", "add")
    ]:  # the printed table is the report's
        assert table[key] == round(report["tasks"][key[0]]["metrics"][key[1]], 2), key
    # The notebook read the shapes world from TFDS datasets it built; what they hold is
    # consistent: an encoder that knows the answers scores 100.
    tfds_dir = work_dir / "tfds"
    retrieval = uds.retrieval_set("shapes_world", config="retrieval", data_dir=tfds_dir)
    sugarcrepe = uds.sugarcrepe_splits("shapes_world", config="compositional", data_dir=tfds_dir)
    assert report["tasks"]["shapes"]["metrics"]["num_images"] == 48  # N_SCENES of 200
    assert report["tasks"]["shapes"]["source"].startswith(f"shapes_world/retrieval/1.0.0 [test] in {tfds_dir}")  # fmt: skip
    oracle = oracle_encoder(retrieval, sugarcrepe)
    assert ev.evaluate_retrieval(oracle, retrieval)["t2i_R@1"] == 100.0
    scores = ev.evaluate_sugarcrepe(oracle, sugarcrepe)
    assert all(v == 100.0 for k, v in scores.items() if k != "num_items")
    assert re.search(r"^rerun in [\d.]+ s: \d+ cache hits, 0 misses$", text, re.MULTILINE)
    assert not [out for out in outputs if out.get("name") == "stderr"], "warnings in the notebook"
    # scenes + similarity heatmap, then recall curves, similarity histogram, SugarCrepe bars
    assert len(pngs) == 5
    assert sorted(p.name for p in tmp_path.glob("unime_eval_*/report/*.png")) == [
        "shapes_recall.png",
        "shapes_similarity.png",
        "shapes_sugarcrepe_accuracy.png",
    ]
