"""Training and evaluation of one (backbone, method, task) under a selection protocol.

Protocols (``eval.select``):
* ``last``     train on the train+val split, report the test accuracy after the final epoch;
* ``best_val`` train on the train split, evaluate on val every ``eval.every`` epochs, restore the
               trainable tensors of the best-val epoch, report its test accuracy;
* ``best_test`` train on train+val, report the best test accuracy over evaluations. It exists only to
               compare with the anchors' numbers and is marked test-selected wherever shown.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from bench import kinds, placement
from bench import state as run_state
from bench.optim import build_optimizer, build_scheduler, default_param_groups
from datasets.base import Task, make_loader

log = logging.getLogger(__name__)

SELECT = ("last", "best_val", "best_test")


class TrainingFailure(RuntimeError):
    """Training stopped: a non-finite loss, out of memory or an exception. ``info`` goes into the failed
    record: ``reason`` (``non_finite_loss`` | ``out_of_memory`` | ``exception``), ``message``, ``epoch`` and
    ``step`` (the 1-based global iteration that failed)."""

    def __init__(self, info: dict):
        self.info = info
        super().__init__(info["message"])


def _bad_input(e: BaseException) -> bool:
    from bench.checks import ConfigError
    from bench.cli import _expected

    return isinstance(e, ConfigError) or isinstance(e, tuple(t for t in _expected() if t is not ValueError))


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))) or (
        isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def autocast_factory(device: torch.device, amp: Optional[str]) -> Optional[Callable]:
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return lambda: torch.autocast("cuda", dtype=dtype)
    return None


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "cpu_max_rss"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a resume needs of the model: trainable tensors and buffers, never the frozen weights."""
    out = {f"param:{n}": p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer:{n}": b.detach().cpu().clone() for n, b in model.named_buffers()})
    return out


def restore_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where) -> None:
    params = {f"param:{n}": p for n, p in model.named_parameters() if p.requires_grad}
    params.update({f"buffer:{n}": b for n, b in model.named_buffers()})
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise run_state.ResumeError(f"cannot resume from {where}: trainable tensors differ (missing "
                                    f"{missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, t in params.items():
            t.copy_(tensors[n].to(t.device))


def protocol_splits(select: str) -> tuple[str, Optional[str]]:
    """(training role, selection role) of a protocol."""
    if select not in SELECT:
        raise ValueError(f"unknown eval.select={select}; choose one of {', '.join(SELECT)}")
    return ("train", "val") if select == "best_val" else ("trainval", "test" if select == "best_test" else None)


def train_and_evaluate(model: nn.Module, method, task: Task, cfg, device: torch.device, logger=None,
                       state: Optional["run_state.RunState"] = None) -> dict:
    """Train and evaluate; with ``state`` (a ``bench.state.RunState``) checkpoint at the end of every epoch
    and continue from its ``last.pt`` when one exists. Failures during training raise ``TrainingFailure``."""
    progress = {"epoch": None, "step": 0, "phase": "prepare"}
    try:
        return _train_and_evaluate(model, method, task, cfg, device, logger, state, progress)
    except (TrainingFailure, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001
        if _bad_input(e):  # a data/file/config problem found while reading batches: one line, exit 2, no record
            raise
        oom = _is_oom(e)
        where = f" at step {progress['step'] + 1} (epoch {progress['epoch']})" if progress["epoch"] is not None \
            else f" during {progress['phase']}"
        raise TrainingFailure({
            "reason": "out_of_memory" if oom else "exception", "type": type(e).__name__,
            "message": f"{'out of memory' if oom else type(e).__name__}{where}: {e}".splitlines()[0][:500],
            "epoch": progress["epoch"], "step": progress["step"] + 1 if progress["epoch"] is not None else None,
            "phase": progress["phase"]}) from e


def _train_and_evaluate(model, method, task, cfg, device, logger, state, progress) -> dict:
    tcfg, ecfg = cfg.train, cfg.eval
    select = str(ecfg.select)
    train_role, select_role = protocol_splits(select)
    seed = int(cfg.seed)
    train_ds = task.split(train_role)
    train_loader, placed = placement.train_loader(train_ds, int(tcfg.batch_size), seed, device, tcfg,
                                                  getattr(task, "kind", "image_cls"))  # DataLoader or device path
    eval_bs = int(ecfg.get("batch_size", 256))
    test_loader = make_loader(task.split("test"), eval_bs, shuffle=False)
    select_loader = make_loader(task.split(select_role), eval_bs, shuffle=False) if select_role else None

    def evaluate(loader):
        return kind.evaluate(model, loader, device, autocast, max_batch=eval_bs)

    kind = kinds.get(getattr(task, "kind", "image_cls")).for_task(task)
    metric = kind.metric
    loss_fn = kind.loss_fn(tcfg)
    model.to(device)
    autocast = autocast_factory(device, tcfg.get("amp"))

    prep_info: dict = {}
    if method.needs_prepare:
        t0 = time.perf_counter()
        prep_loader = make_loader(train_ds, int(cfg.get("prepare_batch_size", 32)), shuffle=False)
        prep_info = dict(method.prepare(model, prep_loader, loss_fn) or {})
        prep_info["prepare_s"] = time.perf_counter() - t0
        model.to(device)
    progress["phase"] = "setup"
    fingerprint = run_state.structure_fingerprint(model)
    placed.update(placement.prepare_model(model, device, tcfg))  # train.channels_last, train.compile

    lr, wd = float(tcfg.lr), float(tcfg.weight_decay)
    groups = method.param_groups(model, lr, wd) or default_param_groups(model, wd, bool(tcfg.get("no_decay_1d", False)))
    opt = build_optimizer(groups, tcfg)
    steps_per_epoch = len(train_loader)
    sched = build_scheduler(opt, tcfg, steps_per_epoch)
    clip = tcfg.get("clip_grad")
    epochs, every = int(tcfg.epochs), max(1, int(ecfg.get("every", 1)))
    max_steps = int(tcfg.get("max_steps") or 0)  # an iteration budget (dense recipes): stop after this many steps
    if max_steps:
        epochs = min(epochs, -(-max_steps // max(1, steps_per_epoch)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, best = [], {"score": -1.0, "epoch": -1, "state": None}
    step, seen, train_time, start_epoch = 0, 0, 0.0, 0
    resumed = None
    ck = state.load() if state is not None else None
    if ck is not None:
        if ck.get("fingerprint") != fingerprint:
            raise run_state.ResumeError(
                f"cannot resume from {state.path}: the method's structure after prepare differs from the "
                f"checkpoint's (a non-deterministic prepare or changed code); delete {state.dir} or run with "
                f"resume=never")
        restore_trainable(model, ck["tensors"], state.path)
        method.load_state_dict(ck.get("method") or {})
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        train_loader.generator.set_state(ck["loader_rng"])
        run_state.set_rng_state(ck["rng"])
        c = ck["counters"]
        step, seen, train_time, history = c["step"], c["seen"], c["train_time"], c["history"]
        best = {**c["best"], "state": ck.get("best_state")}
        start_epoch = c["epoch"] + 1
        prep_info = {**ck.get("prepare", {}), "resume_prepare": prep_info}
        resumed = {"from_epoch": start_epoch, "count": int(c.get("resumed", 0)) + 1, "checkpoint": str(state.path)}
        log.info("resuming from %s: %d of %d epochs done", state.path, start_epoch, epochs)
    bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"{method.name}/{task.name}", unit="it",
               disable=not cfg.get("progress", True), leave=False, mininterval=2.0)
    ck_bytes = None
    for epoch in range(start_epoch, epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_batches = 0.0, 0
        progress.update(epoch=epoch, phase="train")
        for batch in train_loader:
            progress["step"] = step
            batch = kind.to_device(batch, device)
            with autocast() if autocast else contextlib.nullcontext():
                loss = kind.train_loss(model, batch, loss_fn, method)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingFailure({
                    "reason": "non_finite_loss", "type": "NonFiniteLoss", "value": str(loss_value),
                    "message": f"loss is {loss_value} at step {step + 1} (epoch {epoch}): lower train.lr, set "
                               f"train.clip_grad or check the data", "epoch": epoch, "step": step + 1,
                    "phase": "train"})
            opt.zero_grad(set_to_none=True)
            method.before_backward(model, loss)
            loss.backward()
            method.after_backward(model)
            if clip:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], float(clip))
            method.before_step(model, opt)
            opt.step()
            method.after_step(model, opt)
            step += 1
            sched.step_update(step)
            seen += kind.batch_size(batch)
            loss_sum += loss_value
            n_batches += 1
            bar.update(1)
            if max_steps and step >= max_steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(n_batches, 1):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        entry = {"epoch": epoch, "train_loss": loss_sum / max(n_batches, 1), "lr": opt.param_groups[0]["lr"]}
        last_epoch = epoch == epochs - 1
        progress["phase"] = "evaluate"
        if select_loader is not None and ((epoch + 1) % every == 0 or last_epoch):
            res = evaluate(select_loader)
            entry[f"{select_role}_{metric}"] = res[metric]
            if res[metric] > best["score"]:
                best = {"score": res[metric], "epoch": epoch, "metrics": res,
                        "state": trainable_state(model) if select == "best_val" else None}
        history.append(entry)
        if logger is not None:
            logger.log({k: v for k, v in entry.items() if k != "epoch"}, step=epoch)
        log.info("epoch %d/%d %s", epoch + 1, epochs, {k: round(v, 5) for k, v in entry.items() if k != "epoch"})
        if state is not None:
            progress["phase"] = "checkpoint"
            state.save({
                "tensors": checkpoint_tensors(model), "method": method.state_dict(), "fingerprint": fingerprint,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": run_state.rng_state(),
                "loader_rng": train_loader.generator.get_state(), "prepare": prep_info,
                "best_state": best.get("state"),
                "counters": {"epoch": epoch, "step": step, "seen": seen, "train_time": train_time,
                             "history": history, "best": {k: v for k, v in best.items() if k != "state"},
                             "resumed": (resumed or {}).get("count", 0)}})
            ck_bytes = state.path.stat().st_size
    bar.close()
    progress.update(epoch=None, phase="test")

    if select == "best_val" and best["state"] is not None:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for n, v in best["state"].items():
                params[n].copy_(v)
    if select == "best_test":
        scores, chosen = best["metrics"], best["epoch"]
    else:
        scores = evaluate(test_loader)
        chosen = best["epoch"] if select == "best_val" else epochs - 1
    mem, mem_kind = peak_memory_mb(device)
    return {
        "metric": metric,
        "score": scores[metric],
        "metrics": {k: scores[k] for k in kind.metrics if k in scores},
        "eval_views": scores.get("views", 1),
        "selected_epoch": chosen,
        "select_score": best["score"] if select_role else None,
        "history": history,
        "train_images_per_s": seen / train_time if train_time > 0 else None,
        "train_s": train_time,
        "steps": step,
        "peak_mem_mb": mem,
        "peak_mem_kind": mem_kind,
        "prepare": prep_info,
        "resumed": resumed,
        "checkpoint_bytes": ck_bytes,
        "placement": placed,
        "splits": {"train": task.roles[train_role], "select": task.roles.get(select_role) if select_role else None,
                   "test": task.roles["test"]},
    }
