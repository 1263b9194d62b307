import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_AZURE = REPO.parent / "shared" / "data" / "azure_llm_2023_code.csv"

# The tests import eesim from the checkout, installed or not.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def llama7b():
    from eesim.model_spec import MODEL_PRESETS

    return MODEL_PRESETS["llama2-7b"]


@pytest.fixture(scope="session")
def synthetic_trace_7b(llama7b):
    from eesim.exit_trace import synthesize_exit_trace

    return synthesize_exit_trace(llama7b.num_layers, llama7b.all_exits, 300, seed=1)
