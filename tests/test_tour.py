"""docs/tour.ipynb, the first read: it is stored with its outputs (it reads on the code host without
running), and it runs from a fresh checkout, every cell executed in a fresh kernel as a reader would
run it (nbclient); its own asserts check the advantages against the equation and the loss's gradient
against -A per token, so a change to the math that breaks them fails here."""

import os

import nbformat
import pytest
from conftest import REPO

TOUR = os.path.join(REPO, "docs", "tour.ipynb")


def test_the_stored_tour_shows_its_outputs():
    """Every code cell of the stored notebook ran (in order) and shows what it printed or drew, and the
    reward curve is a picture in it."""
    notebook = nbformat.read(TOUR, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert all(cell.outputs for cell in code[1:]), [cell.source[:60] for cell in code if not cell.outputs]
    assert any("image/png" in output.get("data", {}) for cell in code for output in cell.outputs)
    errors = [output for cell in code for output in cell.outputs if output.output_type == "error"]
    assert not errors, errors


def test_the_tour_runs_from_a_fresh_checkout(tmp_path, monkeypatch):
    """All its cells in a new kernel (a few minutes on two CPU cores); any error fails the test, the
    notebook's own checks included."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(TOUR, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("GRPO_TOUR_DIR", str(tmp_path / "tour"))
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(REPO, "docs")}})
    try:
        client.execute()
    except CellExecutionError as e:
        pytest.fail(f"docs/tour.ipynb failed:\n{str(e)[-4000:]}")
    printed = "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for output in cell.outputs)
    assert "ratio on real tokens: [1.0]" in printed
