"""Both notebooks execute top to bottom (nbclient) on a kernel of this test run's Python."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A kernelspec that runs ``sys.executable`` (this venv), found through ``JUPYTER_PATH``.

    The notebooks must run on the interpreter under test, not on whatever ``python`` is first
    on ``PATH`` (what the stock ``python3`` kernelspec would start).
    """
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "moe-vision-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "moe-vision tests",
        "language": "python",
        "env": {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # figures as outputs
        },
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(root))
    yield "moe-vision-test"
    mp.undo()


def _execute(name: str, kernel: str) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name=kernel,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on any exception
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out.append(o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_fusion_designs_notebook(kernel: str) -> None:
    nb = _execute("01_fusion_designs.ipynb", kernel)
    text = _text(nb)
    assert "channel_concat" in text and "sequence_append" in text
    assert "trainable parameters; loss" in text  # the training cell ran (and its loss fell)
    assert _images(nb) >= 3


def test_sweep_analysis_notebook(kernel: str) -> None:
    nb = _execute("02_sweep_analysis.ipynb", kernel)
    text = _text(nb)
    assert "best cell:" in text and "finished" in text
    assert _images(nb) >= 2
