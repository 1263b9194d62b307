"""The analysis notebooks run headless, top to bottom, with small settings (papermill-style parameters)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = Path(__file__).resolve().parents[1]
ANALYSIS = REPO / "analysis"

# Small settings: a few seconds of arrivals, few policies; each notebook well under 30 s.
SMALL = {
    "policy_comparison.ipynb": {"DURATION": 20, "RULES": ["full", "all_confident", "per_sequence"],
                                "KV_POLICIES": ["fill", "copy_hidden"]},
    "pareto.ipynb": {"WORKLOAD": "poisson:rate=2.5,duration=10", "THRESHOLDS": [0.5, 0.9],
                     "POLICIES": ["full", "all_confident + fill", "per_sequence + fill"], "WORKERS": 1},
    "kv_cost.ipynb": {"WORKLOAD": "poisson:rate=2.5,duration=15"},
}


def inject(nb, params: dict) -> None:
    """Insert a cell after the one tagged ``parameters`` that overrides its settings, as papermill does."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def test_every_notebook_is_covered():
    assert {p.name for p in ANALYSIS.glob("*.ipynb")} == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs(name, tmp_path, monkeypatch):
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), "no parameters cell"
    inject(nb, SMALL[name])
    # the kernel imports eesim from this checkout and draws with the inline backend, in a scratch folder
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=60, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # a failing cell raises CellExecutionError
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs), \
        "no figure was drawn"
