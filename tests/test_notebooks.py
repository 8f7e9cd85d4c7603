"""The Colab notebooks run top to bottom (with their SMALL switch on) and show their results."""

import json
import os
import re

import nbclient
import nbformat
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
COLAB = os.path.join(ROOT, "colab")
CELL_TIMEOUT = 300  # seconds per cell; the small runs take about a minute in all


def load(name: str):
  return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)


def run_small(name: str):
  """Executes colab/<name>.ipynb from colab/ with its first code cell's SMALL switch on."""
  nb = load(name)
  first = next(c for c in nb.cells if c.cell_type == "code")
  assert "SMALL = False" in first.source, "the first code cell must hold the `SMALL = False` switch"
  first.source = first.source.replace("SMALL = False", "SMALL = True")
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                   resources={"metadata": {"path": COLAB}})
  client.execute()
  return nb


def outputs(nb):
  return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def text(nb) -> str:
  out = []
  for o in outputs(nb):
    if o.output_type == "stream":
      out.append(o.text)
    elif "data" in o:
      out.append(o.data.get("text/markdown", "") + o.data.get("text/plain", ""))
  return "\n".join(out)


@pytest.mark.parametrize("name", ["quickstart", "api_tour"])
def test_notebook_is_clean_and_colab_ready(name):
  nb = load(name)
  nbformat.validate(nb)
  assert nb.metadata["kernelspec"]["name"] == "python3"
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, "stored outputs: clear them"
  first = nb.cells[0]
  assert first.cell_type == "markdown"
  assert (f"https://colab.research.google.com/github/ORG/quee_jax/blob/main/colab/{name}.ipynb"
          in first.source)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code[0].source.strip().endswith("SMALL = False")
  # The install step runs only when quee_jax is not importable.
  install = next(c.source for c in code if '"pip", "install"' in c.source)
  assert "except ImportError" in install


def test_quickstart_runs_the_demo_pipeline(tmp_path, monkeypatch):
  workdir = tmp_path / "demo"
  monkeypatch.setenv("QUEE_QUICKSTART_WORKDIR", str(workdir))
  monkeypatch.delenv("QUEE_JAX_ROOT", raising=False)  # found from the working directory
  nb = run_small("quickstart")
  out = text(nb)
  assert f"repository: {ROOT}" in out
  assert "wrote " in out and "stage evaluate" in out
  results = json.loads((workdir / "results.json").read_text())
  assert results["split_sizes"] == {"fit": 300, "cal": 200, "test": 200}
  assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = (workdir / "report.md").read_text()
  assert "| quee |" in report and "| ee_confidence" in report
  kinds = [set(o.get("data", {})) for o in outputs(nb)]
  assert any("image/png" in k for k in kinds), "the curves are not displayed"
  shown = [o.data["text/markdown"] for o in outputs(nb) if "text/markdown" in o.get("data", {})]
  assert shown and "| quee |" in shown[0], "the results table is not displayed"


def test_api_tour_runs(tmp_path, monkeypatch):
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's checkpoints (tempfile.mkdtemp)
  nb = run_small("api_tour")
  out = text(nb)
  for expected in ("'train': 500", "test accuracy (%) per exit", "float:", "w2a4:",
                   "full model (float): test accuracy", "budget 0.0625: λ = ", "δ = 5 pt: "):
    assert expected in out, expected
  # The summary table: auc and auc_16 of QuEE and each baseline, in %.
  rows = dict(re.findall(
      r"^(quee|ee_confidence \(naive\)|static|oracle_consistency \(on test\)) +(\d+\.\d+) ",
      out, re.M))
  assert len(rows) == 4, out
  assert all(0 < float(auc) <= 100 for auc in rows.values()), rows
  figures = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
  assert figures, "the accuracy-cost figure is not shown"
