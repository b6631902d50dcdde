"""The method interface. The runner calls, in order:

1. ``apply(model)``: freeze the backbone, inject the method's modules, head trainable;
2. ``prepare(model, train_loader, loss_fn)`` if the method is data-dependent (``needs_prepare``);
3. every step: ``training_loss(model, x, y, logits, loss)`` (a method adding its own loss terms returns
   the total), ``before_backward(model, loss)``, ``after_backward(model)``,
   ``before_step(model, optimizer)``, ``after_step(model, optimizer)``;
4. ``param_groups(model, lr, weight_decay)`` (per-parameter lr/wd; None = the engine's default);
   on resume the runner re-runs 1 and 2, then restores tensors, optimiser and ``load_state_dict``;
5. ``merge(model)`` (re-parameterisable methods) folds the method into plain backbone weights.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from torch import nn

from backbones import Sites, head_of, sites
from methods.blocks.merge import merge_wrappers


class NotMergeableError(NotImplementedError):
    pass


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


class Method:
    """Base class. Subclasses implement ``inject``; the registry sets ``name``."""

    name: str = "?"
    families: tuple[str, ...] = ("vit",)  # backbone families the method is defined on
    needs_prepare: bool = False
    mergeable: bool = False
    identity_at_init: bool = False  # zero-initialised branches: logits equal the frozen model's at step 0

    def __init__(self, cfg: Optional[Mapping[str, Any]] = None):
        self.cfg = dict(cfg or {})
        # Set by the runner before ``prepare``: dataset, backbone, checkpoint, seed, cache_dir, device.
        # Data-dependent methods key their caches with it (e.g. SPT's sensitivity files).
        self.context: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        v = self.cfg.get(key, default)
        return default if v is None else v

    # -- 1. apply -------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> nn.Module:
        s = sites(model).require(self.name, self.families)
        freeze(model)
        self.inject(model, s)  # new modules are created trainable
        unfreeze(head_of(model).parameters())
        return model

    def inject(self, model: nn.Module, sites: Sites) -> None:
        raise NotImplementedError

    # -- 2. data-dependent preparation ----------------------------------------------------
    def prepare(self, model: nn.Module, train_loader, loss_fn) -> dict:
        """Return a dict of facts to store in the result record (e.g. timings)."""
        return {}

    # multi-process runs: rank 0 runs ``prepare``, the other ranks rebuild its result from this state
    # (``bench.distributed``); None = not supported, then every rank runs ``prepare`` itself
    def selection_state(self) -> Any:
        """What ``prepare`` selected (picklable: masks, indices, structure), or None."""
        return None

    def load_selection(self, model: nn.Module, state: Any) -> None:
        """Build on ``model`` (after ``apply``) the structure that ``prepare`` built from ``state``
        (``selection_state()`` of the rank that ran it); tensor values are sent separately."""
        raise NotImplementedError

    # -- 3. per-step hooks ------------------------------------------------------------------
    def training_loss(self, model: nn.Module, x, y, logits, loss):
        """The loss to minimise this step, given the task loss of ``logits`` (default: ``loss`` itself)."""
        return loss

    def before_backward(self, model: nn.Module, loss) -> None:
        pass

    def after_backward(self, model: nn.Module) -> None:
        pass

    def before_step(self, model: nn.Module, optimizer) -> None:
        pass

    def after_step(self, model: nn.Module, optimizer) -> None:
        pass

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Method state that is not a tensor of the model (e.g. a step counter of a schedule inside the
        method), saved in every epoch checkpoint. Tensors (trainable ones and buffers, such as a data-dependent
        selection's masks) are saved by the engine; ``prepare`` re-runs on resume and must rebuild the same
        structure (checked). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- 4. optimisation groups -------------------------------------------------------------
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> Optional[list[dict]]:
        return None

    # -- 5. merge ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> nn.Module:
        if not self.mergeable:
            raise NotMergeableError(f"method '{self.name}' cannot be merged into the backbone weights")
        merge_wrappers(model)
        return model

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg}


def register(name: str):
    """Class decorator: register a Method subclass under ``name`` (= its yaml name in conf/method/)."""
    from bench.registry import METHODS

    def deco(cls):
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco
