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
import resource
import time
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from bench import kinds
from bench.optim import build_optimizer, build_scheduler, default_param_groups
from datasets.base import Task, make_loader

log = logging.getLogger(__name__)

SELECT = ("last", "best_val", "best_test")


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


def protocol_splits(select: str) -> tuple[str, Optional[str]]:
    """(training role, selection role) of a protocol."""
    if select not in SELECT:
        raise ValueError(f"unknown eval.select={select}; choose one of {', '.join(SELECT)}")
    return ("train", "val") if select == "best_val" else ("trainval", "test" if select == "best_test" else None)


def train_and_evaluate(model: nn.Module, method, task: Task, cfg, device: torch.device, logger=None) -> dict:
    tcfg, ecfg = cfg.train, cfg.eval
    select = str(ecfg.select)
    train_role, select_role = protocol_splits(select)
    seed = int(cfg.seed)
    train_ds = task.split(train_role)
    train_loader = make_loader(train_ds, int(tcfg.batch_size), shuffle=True, seed=seed, drop_last=False)
    eval_bs = int(ecfg.get("batch_size", 256))
    test_loader = make_loader(task.split("test"), eval_bs, shuffle=False)
    select_loader = make_loader(task.split(select_role), eval_bs, shuffle=False) if select_role else None

    def evaluate(loader):
        return kind.evaluate(model, loader, device, autocast, max_batch=eval_bs)

    kind = kinds.get(getattr(task, "kind", "image_cls"))
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

    lr, wd = float(tcfg.lr), float(tcfg.weight_decay)
    groups = method.param_groups(model, lr, wd) or default_param_groups(model, wd, bool(tcfg.get("no_decay_1d", False)))
    opt = build_optimizer(groups, tcfg)
    steps_per_epoch = len(train_loader)
    sched = build_scheduler(opt, tcfg, steps_per_epoch)
    clip = tcfg.get("clip_grad")
    epochs, every = int(tcfg.epochs), max(1, int(ecfg.get("every", 1)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history, best = [], {"score": -1.0, "epoch": -1, "state": None}
    step, seen, train_time = 0, 0, 0.0
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"{method.name}/{task.name}", unit="it",
               disable=not cfg.get("progress", True), leave=False, mininterval=2.0)
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        loss_sum, n_batches = 0.0, 0
        for batch in train_loader:
            batch = kind.to_device(batch, device)
            with autocast() if autocast else contextlib.nullcontext():
                loss = kind.train_loss(model, batch, loss_fn, method)
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
            loss_sum += loss.item()
            n_batches += 1
            bar.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_sum / max(n_batches, 1):.3f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        entry = {"epoch": epoch, "train_loss": loss_sum / max(n_batches, 1), "lr": opt.param_groups[0]["lr"]}
        last_epoch = epoch == epochs - 1
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
    bar.close()

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
        "splits": {"train": task.roles[train_role], "select": task.roles.get(select_role) if select_role else None,
                   "test": task.roles["test"]},
    }
