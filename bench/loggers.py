"""Optional experiment loggers (wandb), imported lazily and never needed by the tests."""
from __future__ import annotations

import os


class NullLogger:
    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def finish(self, summary: dict | None = None) -> None:
        pass


class WandbLogger(NullLogger):
    def __init__(self, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise SystemExit("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from None
        if "WANDB_API_KEY" not in os.environ and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"  # no key: keep the run on disk, never block
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "petl-bench"), name=name, config=config)

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def finish(self, summary: dict | None = None) -> None:
        if summary:
            self.run.summary.update(summary)
        self.run.finish()


def build_logger(kind: str, config: dict, name: str):
    if kind in (None, "none", "null"):
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(config, name)
    raise ValueError(f"unknown logger={kind}; choose none or wandb")
