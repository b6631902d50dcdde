"""``python -m bench [overrides]`` runs one job; ``python -m bench -m ...`` sweeps (Hydra multirun)."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from bench import CONF_DIR
from bench.cli import friendly_errors


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> dict | None:
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task)
    with friendly_errors():
        from bench import checks

        # keys, values and files first: a mistake costs no torch import, no model, no data
        checks.check_keys(cfg)
        if cfg.get("mode") == "train":
            checks.check_values(cfg)
            if not cfg.get("skip_done"):
                checks.preflight(cfg)
        from bench.run import run

        # the record (or params report): a multirun's JobReturn carries it back to the launcher process
        return run(cfg, overrides)


if __name__ == "__main__":
    from bench.checks import check_override_keys
    from bench.cli import check_group_overrides, expand_group_globs

    sys.argv[1:] = expand_group_globs(sys.argv[1:])
    problem = check_group_overrides(sys.argv[1:]) or check_override_keys(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
