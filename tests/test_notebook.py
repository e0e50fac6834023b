"""notebooks/walkthrough.ipynb runs top to bottom (real kernel, real embedded model) on a small
slice, so the walkthrough cannot rot."""

import nbformat
import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

FAST = """GLOSSARY = "data/glossaries/aviation.yaml"
N_TERMS = 3
EPOCHS = 1
MAX_STEPS = -1
MIN_STEPS = 0
REPLAY = 0.0
WORKDIR = "{workdir}"
"""


def test_walkthrough_notebook_runs(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "walkthrough.ipynb", as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = FAST.format(workdir=tmp_path / "nb")
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    text = "\n".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "3 terms ->" in text
    assert "parity: max |logit diff|" in text
    assert "tuned  accuracy" in text and "Q: What is" in text
    assert (tmp_path / "nb" / "merged" / "model.safetensors").is_file()
