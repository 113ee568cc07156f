"""Every notebook in notebooks/ runs from top to bottom (quick settings)."""

import glob
import os

import jupytext
from nbclient import NotebookClient
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.py")))


def test_there_are_notebooks():
  assert NOTEBOOKS


# One worker runs them all: they share the quick pretrained runs under runs/.
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("GRACEFUL_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = jupytext.read(path)
  # From the repository root, as `make test` runs; a failing cell raises here.
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": ROOT}}).execute()
  errors = [o for cell in nb.cells for o in cell.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
