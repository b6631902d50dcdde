import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.imports import import_suite  # noqa: E402

import_suite()
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Generated data go to one per-session temp cache, never to the user's home."""
    monkeypatch.setenv("PETL_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
