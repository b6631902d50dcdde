"""petl-bench: the runner package (registry, engine, metrics, results, leaderboard)."""
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"

# ${suite_path:backbones/weights/x.safetensors} in a config: a file shipped with the suite, as an absolute
# path, so runs started from any directory find it
OmegaConf.register_new_resolver("suite_path", lambda rel: str(ROOT / rel), replace=True)

__all__ = ["ROOT", "CONF_DIR"]
