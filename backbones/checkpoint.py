"""Loading user-downloaded checkpoints into a backbone, with errors that say what does not fit."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    pass


def read_state_dict(path: str | Path) -> StateDict:
    """Read a timm-style state dict from ``.pth``/``.pt``/``.bin``/``.tar`` or ``.safetensors``.

    Unwraps the usual containers (``model``, ``state_dict``, ``module.`` prefixes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (set backbone.checkpoint=PATH to a downloaded file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items() if torch.is_tensor(v)}


def fit_state_dict(
    model: nn.Module,
    sd: StateDict,
    source: str,
    backbone: str,
    skip: Callable[[str], bool] = lambda k: False,
) -> None:
    """Copy ``sd`` into ``model``; every backbone tensor must be present with the right shape.

    ``skip(key)`` names model keys that a checkpoint need not provide (the task head, PETL modules).
    Raises one error listing missing keys, unexpected keys and differing shapes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not skip(k)]
    unexpected = [k for k in sd if k not in own and not skip(k)]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and not skip(k) and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        def show(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "") if xs else "none"

        raise CheckpointError(
            f"checkpoint {source} does not fit backbone '{backbone}': missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shapes differ (checkpoint vs model): {show(shapes)}. "
            f"Pick the backbone config that matches the file (backbone=...)"
        )
    load = {k: v for k, v in sd.items() if k in own and not skip(k)}
    model.load_state_dict(load, strict=False)
    log.info("loaded %d tensors from %s", len(load), source)


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    backbone: str,
    filter_fn: Optional[Callable[[StateDict, nn.Module], StateDict]] = None,
    head_prefixes: tuple[str, ...] = ("head.",),
) -> None:
    sd = read_state_dict(path)
    if filter_fn is not None:
        sd = filter_fn(sd, model)
    sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
    fit_state_dict(model, sd, str(path), backbone, skip=lambda k: k.startswith(head_prefixes))
