"""notebooks/unime_eval.ipynb runs top to bottom with the offline demo model (no downloads) in a
fresh kernel of this interpreter, and shows its similarity matrix, metrics and plots."""

import re
import sys
from pathlib import Path

import pytest

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
    for key in [("shapes", f"{d}_R@{k}") for d in ("t2i", "i2t") for k in (1, 5, 10)] + [
        ("shapes_sugarcrepe", m) for m in ("replace_att", "swap_obj", "add_att", "replace", "add")
    ]:
        assert 0 <= table[key] <= 100, key
    assert re.search(r"^rerun in [\d.]+ s: \d+ cache hits, 0 misses$", text, re.MULTILINE)
    assert not [out for out in outputs if out.get("name") == "stderr"], "warnings in the notebook"
    # scenes + similarity heatmap, then recall curves, similarity histogram, SugarCrepe bars
    assert len(pngs) == 5
    assert sorted(p.name for p in tmp_path.glob("unime_eval_*/report/*.png")) == [
        "shapes_recall.png",
        "shapes_similarity.png",
        "shapes_sugarcrepe_accuracy.png",
    ]
