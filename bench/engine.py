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

from bench import distributed as dist
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
    kind = kinds.get(getattr(task, "kind", "image_cls")).for_task(task)
    world, rank = dist.world_size(), dist.rank()
    batch_size = int(tcfg.batch_size)  # the global batch (train_job checked it divides by the world size)
    train_ds = task.split(train_role)
    n_train = len(train_ds)
    train_loader, placed = placement.train_loader(train_ds, batch_size, seed, device, tcfg,  # DataLoader or device path
                                                  getattr(task, "kind", "image_cls"),
                                                  shard=(world, rank) if world > 1 else None)
    eval_bs = int(ecfg.get("batch_size", 256))
    shard_eval = world > 1 and kind.shardable_eval  # else every rank evaluates the whole split

    def eval_loader(ds):
        if not shard_eval:
            return make_loader(ds, eval_bs, shuffle=False)
        a, b = dist.shard_range(len(ds), world, rank)
        return make_loader(ds, eval_bs, shuffle=False, indices=range(a, b))

    test_loader = eval_loader(task.split("test"))
    select_loader = eval_loader(task.split(select_role)) if select_role else None

    def evaluate(loader):
        res = kind.evaluate(model, loader, device, autocast, max_batch=eval_bs)
        return kind.merge_eval(dist.all_gather_object(res)) if shard_eval else res

    metric = kind.metric
    loss_fn = kind.loss_fn(tcfg)
    model.to(device)
    autocast = autocast_factory(device, tcfg.get("amp"))

    prep_info: dict = {}
    if method.needs_prepare:
        t0 = time.perf_counter()
        prep_loader = make_loader(train_ds, int(cfg.get("prepare_batch_size", 32)), shuffle=False)
        if dist.is_main():
            prep_info = dict(method.prepare(model, prep_loader, loss_fn) or {})
            prep_info["prepare_s"] = time.perf_counter() - t0
        if world > 1:  # rank 0's selection, rebuilt on the other ranks (or, unsupported: each one prepares)
            selection, prep_info = dist.broadcast_object(
                (method.selection_state() if dist.is_main() else None, prep_info))
            if not dist.is_main():
                if selection is not None:
                    method.load_selection(model, selection)
                else:
                    method.prepare(model, prep_loader, loss_fn)
            prep_info = {**prep_info, "selected_on": "rank 0, broadcast" if selection is not None else "every rank"}
        model.to(device)
    progress["phase"] = "setup"
    if world > 1:  # identical trainables, buffers and RNG streams on every rank: rank 0's
        dist.broadcast_model_state(model)
        dist.broadcast_rng()
    fingerprint = run_state.structure_fingerprint(model)
    if world > 1:
        prints = dist.all_gather_object(fingerprint)
        if len(set(prints)) != 1:
            raise RuntimeError(f"the ranks built different structures (fingerprints {prints}): the method's "
                               f"prepare/load_selection is not deterministic")
    placed.update(placement.prepare_model(model, device, tcfg))  # train.channels_last, train.compile

    lr, wd = float(tcfg.lr), float(tcfg.weight_decay)
    groups = method.param_groups(model, lr, wd) or default_param_groups(model, wd, bool(tcfg.get("no_decay_1d", False)),
                                                                         list(tcfg.get("no_decay_keys") or []))
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
    if world > 1:  # only rank 0 holds the run state; every rank resumes from its checkpoint
        ck = dist.broadcast_object(ck)
    if ck is not None:
        # rank 0 holds the state folder; the other ranks got its checkpoint through the process group
        where = state.path if state is not None else "rank 0's checkpoint"
        folder = state.dir if state is not None else "rank 0's state folder"
        if ck.get("fingerprint") != fingerprint:
            raise run_state.ResumeError(
                f"cannot resume from {where}: the method's structure after prepare differs from the "
                f"checkpoint's (a non-deterministic prepare or changed code); delete {folder} or run with "
                f"resume=never")
        restore_trainable(model, ck["tensors"], where)
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
        resumed = {"from_epoch": start_epoch, "count": int(c.get("resumed", 0)) + 1, "checkpoint": str(where)}
        log.info("resuming from %s: %d of %d epochs done", where, start_epoch, epochs)
    trainables = list({id(p): p for g in opt.param_groups for p in g["params"]}.values())
    bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=f"{method.name}/{task.name}", unit="it",
               disable=not cfg.get("progress", True) or not dist.is_main(), leave=False, mininterval=2.0)
    ck_bytes = None
    for epoch in range(start_epoch, epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_batches = 0.0, 0
        progress.update(epoch=epoch, phase="train")
        for i, batch in enumerate(train_loader):
            progress["step"] = step
            if world > 1:
                # this rank's share of the global batch: its mean loss weighs n_local / n_global, so the
                # all-reduced (summed) loss and gradients are the single-process ones on the global batch
                n_global = dist.global_batch_size(n_train, batch_size, i)
                a, b = dist.shard_range(n_global, world, rank)
                weight = (b - a) / n_global
                loss = None
                if b > a:  # an empty share of a short last batch (a placeholder batch) is skipped
                    batch = kind.to_device(batch, device)
                    with autocast() if autocast else contextlib.nullcontext():
                        loss = kind.train_loss(model, batch, loss_fn, method) * weight
                loss_value = dist.all_reduce_sum([loss.item() if loss is not None else 0.0], device)[0]
            else:
                batch = kind.to_device(batch, device)
                with autocast() if autocast else contextlib.nullcontext():
                    loss = kind.train_loss(model, batch, loss_fn, method)
                loss_value = loss.item()
                n_global = kind.batch_size(batch)
            if not math.isfinite(loss_value):
                raise TrainingFailure({
                    "reason": "non_finite_loss", "type": "NonFiniteLoss", "value": str(loss_value),
                    "message": f"loss is {loss_value} at step {step + 1} (epoch {epoch}): lower train.lr, set "
                               f"train.clip_grad or check the data", "epoch": epoch, "step": step + 1,
                    "phase": "train"})
            opt.zero_grad(set_to_none=True)
            if loss is not None:
                method.before_backward(model, loss)
                loss.backward()
            dist.reduce_gradients(trainables)
            method.after_backward(model)
            if clip:
                nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], float(clip))
            method.before_step(model, opt)
            opt.step()
            method.after_step(model, opt)
            step += 1
            sched.step_update(step)
            seen += n_global
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
