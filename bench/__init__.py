"""petl-bench: the runner package (registry, engine, metrics, results, leaderboard)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

__all__ = ["ROOT", "CONF_DIR"]
