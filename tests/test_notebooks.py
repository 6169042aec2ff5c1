"""Every notebook in notebooks/ runs top to bottom (offline: a fake OpenAI server)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install nbformat nbclient ipykernel")
nbclient = pytest.importorskip("nbclient", reason="pip install nbformat nbclient ipykernel")
pytest.importorskip("ipykernel", reason="pip install ipykernel")
pytest.importorskip("matplotlib", reason="pip install matplotlib")
pytest.importorskip("langchain_openai", reason="the notebooks use langchain-openai")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def outputs_of(notebook: Any) -> list[Any]:
    return [out for cell in notebook.cells if cell.cell_type == "code"
            for out in cell.get("outputs", [])]


def inline_images(outputs: list[Any]) -> list[str]:
    return [out["data"]["image/png"] for out in outputs
            if out.get("output_type") in ("display_data", "execute_result")
            and "image/png" in out.get("data", {})]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUDGETKIT_DB", str(tmp_path / "default.db"))  # never the user's file
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # run from a blank page, as a reader who clears outputs
        if cell.cell_type == "code":
            cell.outputs = []
    client = nbclient.NotebookClient(notebook, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    outputs = outputs_of(notebook)
    assert not [out for out in outputs if out.get("output_type") == "error"]
    text = "".join(out.get("text", "") for out in outputs)
    assert "cache hits" in text and "stopped" in text and "saved" in text
    assert inline_images(outputs)  # the plots are drawn inline, not saved to a file


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_executed_with_its_plots(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.get("execution_count") for cell in code), "run it top to bottom, then save"
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1))  # in order, once each
    outputs = outputs_of(notebook)
    assert not [out for out in outputs if out.get("output_type") == "error"]
    images = inline_images(outputs)  # the plots open with the notebook
    assert images and all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)


def test_there_is_a_quickstart() -> None:
    assert any(p.stem == "quickstart" for p in NOTEBOOKS)
