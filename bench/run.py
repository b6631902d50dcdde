"""One job: compose backbone × method × dataset, train, evaluate, write the record."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
import uuid
from datetime import datetime, timezone

import torch
from omegaconf import DictConfig, OmegaConf

from bench import env, kinds
from bench.imports import import_suite
from bench.cli import RunFailed  # noqa: F401  (raised here; bench.run.RunFailed stays importable)
from bench.engine import TrainingFailure
from bench.metrics import count_params, ppt

log = logging.getLogger("bench")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def method_variant(overrides: list[str]) -> str:
    """The method's command-line overrides (e.g. ``rank=4``): rows of the leaderboard."""
    keys = sorted(o.split(".", 1)[1] for o in overrides if o.startswith("method.") and "=" in o)
    return ",".join(keys)


def effective_drop_path(model) -> float:
    """The largest stochastic-depth rate left in the model (a method may switch it off, e.g. VPT-Deep)."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth

    rates = [float(m.drop_prob) for m in model.modules() if isinstance(m, DropPath)]
    rates += [float(m.p) for m in model.modules() if isinstance(m, StochasticDepth)]  # torchvision (Video Swin)
    return round(max(rates, default=0.0), 6)


def build_model(cfg: DictConfig, device: str | torch.device = "cpu"):
    """Backbone + method applied; returns (model, method)."""
    import backbones
    import methods

    method = methods.build(cfg.method)
    method.context = {
        "dataset": cfg.dataset.name, "backbone": cfg.backbone.name, "checkpoint": cfg.backbone.get("checkpoint"),
        "seed": int(cfg.seed), "cache_dir": cfg.get("cache_dir"), "num_classes": int(cfg.dataset.num_classes),
    }
    kind = kinds.get(str(cfg.dataset.get("kind", "image_cls")))
    model = kind.build_model(cfg, device)  # classification: the backbone; dense: Swin-Det + the decoder as head
    method.apply(model)
    after = getattr(model, "petl_after_apply", None)  # e.g. the VOC recipe's frozen patch embedding
    if after is not None:
        after(model)
    return model, method


def params_report(cfg: DictConfig) -> dict:
    model, method = build_model(cfg, device="meta")
    import backbones

    counts = count_params(model, backbones.head_of(model))
    return {"method": method.name, "backbone": cfg.backbone.name, "trainable_params": counts["trainable_params"],
            "head_params": counts["head_params"], "total_params": counts["total_params"]}


class RunInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during training: no record; the epoch checkpoint stays for the next run to resume."""


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    from bench import checks

    import_suite()
    checks.check_keys(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.mode == "params":
        report = params_report(cfg)
        print(json.dumps(report))
        return report
    if cfg.mode != "train":
        raise ValueError(f"unknown mode={cfg.mode}; choose train or params")
    return train_job(cfg, overrides or [])


def find_done(results_dir, chash: str) -> dict | None:
    """The newest ``status: ok`` record with config hash ``chash`` under ``results_dir``, or None."""
    from pathlib import Path

    needle = f'"config_hash": "{chash}"'
    best = None
    for p in (Path(results_dir) / "runs").rglob("*.json"):
        try:
            text = p.read_text()
        except OSError:
            continue
        if needle not in text:
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            continue
        if rec.get("config_hash") == chash and rec.get("status") == "ok":
            if best is None or (rec.get("created", ""), rec.get("run_id", "")) > (best.get("created", ""), best.get("run_id", "")):
                best = {**rec, "_path": str(p)}
    return best


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Pre-emption sends SIGTERM: stop like Ctrl-C (the last epoch checkpoint stays for resume)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RunInterrupted(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def preflight_build(cfg: DictConfig) -> None:
    """Method × backbone support and budgets, on the meta device (no weights, no data, no RNG moved)."""
    from bench import checks
    from bench.state import preserved_rng

    with preserved_rng():
        _, method = build_model(cfg, device="meta")
    checks.check_budget(method)


def train_job(cfg: DictConfig, overrides: list[str]) -> dict:
    """One training job; under ``torchrun`` every process runs it (``bench.distributed``): rank 0 alone writes
    the record and the checkpoints, and all processes leave the process group at the end."""
    from bench import distributed

    device = distributed.local_device(env.resolve_device(str(cfg.device)))
    dcfg = cfg.get("dist") or {}
    world = distributed.env_world_size()
    if world > 1 and int(cfg.train.batch_size) % world:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is the global batch and must divide by the "
                         f"{world} processes: pick a multiple of {world} or another --nproc_per_node")
    distributed.setup(device, str(dcfg.get("backend", "auto")), float(dcfg.get("timeout_min", 60)))
    ok = False
    try:
        rec = _train_job(cfg, overrides, device)
        ok = True
        return rec
    finally:
        distributed.shutdown(wait=ok)


def _train_job(cfg: DictConfig, overrides: list[str], device: torch.device) -> dict:
    import backbones
    import datasets
    from bench import checks
    from bench.engine import train_and_evaluate
    from bench.loggers import build_logger
    from bench.results import write_record
    from bench import distributed
    from bench.state import RunState, config_hash

    main = distributed.is_main()
    t_start = time.perf_counter()
    checks.check_values(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(resolved)
    if cfg.get("skip_done"):
        done = distributed.broadcast_object(find_done(cfg.results.dir, chash) if main else None)
        if done is not None:
            if main:
                print(f"[skip] config {chash} already done: {done['_path']}")
            return {**done, "skipped": True}
    checks.preflight(cfg)
    seed_everything(int(cfg.seed))
    preflight_build(cfg)
    b = cfg.backbone
    kinds.get(str(cfg.dataset.get("kind", "image_cls"))).check_backbone(str(b.family), b.name, cfg.dataset.name)
    with distributed.main_first():  # rank 0 generates/caches the data, the others read its cache
        task = datasets.build(cfg.dataset, image_size=int(b.img_size), mean=list(b.mean), std=list(b.std))
    if task.num_classes != int(cfg.dataset.num_classes):
        raise ValueError(f"dataset.num_classes={cfg.dataset.num_classes} but {task.name} has {task.num_classes} classes")
    seed_everything(int(cfg.seed))
    model, method = build_model(cfg, device="cpu")
    counts = count_params(model, backbones.head_of(model))
    variant = method_variant(overrides)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    run_name = f"{method.name}{'[' + variant + ']' if variant else ''}/{task.name}/{b.name}/seed{cfg.seed}"
    run_id = distributed.broadcast_object(run_id)
    logger = build_logger(cfg.get("logger", "none") if main else "none", resolved, run_name)
    log.info("run %s on %s: %d trainable params (+%d head)", run_name, device, counts["trainable_params"], counts["head_params"])

    if cfg.get("recipe"):
        log.info("recipe for %s on %s: %s", method.name, task.name, cfg.recipe.get("source", "?"))
    else:
        log.warning("no recipe for method %s on dataset %s (no conf/recipe/%s/%s.yaml): using the method's "
                    "defaults", method.name, task.name, method.name, task.name)
    # only rank 0 holds the state folder (lock, epoch checkpoints); the engine sends its checkpoint to the others
    state = RunState(cfg.results.dir, chash, run_id, resume=str(cfg.get("resume", "auto")) == "auto") if main else None
    dist_info = distributed.info()
    base = {
        "schema": 1, "run_id": run_id, "config_hash": chash, "benchmark": task.benchmark, "dataset": task.name,
        "backbone": b.name, "method": method.name, "variant": variant, "seed": int(cfg.seed),
        "kind": getattr(task, "kind", "image_cls"),
    }
    try:
        with sigterm_as_interrupt():
            out = train_and_evaluate(model, method, task, cfg, device, logger, state=state)
    except KeyboardInterrupt:
        if state is None:
            raise
        state.release(remove=not state.shared)
        where = f"{state.path} (rerun the same command to resume)" if state.path.exists() and state.shared else \
            "no checkpoint yet"
        print(f"error: interrupted; {where}", file=sys.stderr)
        raise
    except TrainingFailure as e:
        info = e.info
        rec = {**base, "status": "failed", "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "failure": info, "metric": None, "score": None,
               **count_params(model, backbones.head_of(model)),
               "protocol": {"select": str(cfg.eval.select), "test_selected": str(cfg.eval.select) == "best_test"},
               "perf": {"wall_s": time.perf_counter() - t_start, **({"distributed": dist_info} if dist_info else {})},
               "env": {"versions": env.versions(), "git": env.git_state(), "device": env.device_info(device)},
               "overrides": list(overrides), "config": resolved}
        if not main:
            raise RunFailed(f"run failed: {info['message']} (rank {distributed.rank()}; rank 0 writes the record)",
                            rec) from e
        path = write_record(cfg.results.dir, rec)
        state.release(remove=not state.shared)  # the shared last.pt stays: a fixed re-run resumes from it
        log.error("run %s failed: %s", run_name, info["message"])
        raise RunFailed(f"run failed: {info['message']} (record {path})", {**rec, "_path": str(path)}) from e
    metric, score = out["metric"], out["score"]
    counts = count_params(model, backbones.head_of(model))  # after prepare (data-dependent methods)
    rec = {
        **base,
        "status": "ok",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metric": metric,
        "score": score,
        "metrics": out["metrics"],
        **({"top1": score} if metric == "top1" else {}),
        **counts,
        "ppt": ppt(score / 100.0, counts["trainable_params"]),
        "protocol": {
            "select": str(cfg.eval.select),
            "test_selected": str(cfg.eval.select) == "best_test",
            "train_split": out["splits"]["train"],
            "select_split": out["splits"]["select"],
            "eval_split": out["splits"]["test"],
            "selected_epoch": out["selected_epoch"],
            "select_score": out["select_score"],
            "image_size": task.image_size,
            "views": out["eval_views"],  # views averaged per test example (video: temporal x spatial)
            **kinds.get(getattr(task, "kind", "image_cls")).for_task(task).protocol(task),
            "normalization": {"mean": list(task.mean), "std": list(task.std)},
            "optimizer": {k: resolved["train"].get(k) for k in ("optimizer", "lr", "weight_decay", "no_decay_1d",
                                                                  "no_decay_keys")},
            "schedule": {k: resolved["train"].get(k) for k in ("epochs", "warmup_epochs", "warmup_lr", "min_lr",
                                                                     "schedule", "milestones", "max_steps",
                                                                     "warmup_steps", "poly_power")},
            "batch_size": int(cfg.train.batch_size),
            "label_smoothing": float(cfg.train.label_smoothing),
            "drop_path": effective_drop_path(model),
        },
        "perf": {"peak_mem_mb": out["peak_mem_mb"], "peak_mem_kind": out["peak_mem_kind"],
                 "train_images_per_s": out["train_images_per_s"], "train_s": out["train_s"],
                 "wall_s": time.perf_counter() - t_start, "steps": out["steps"],
                 "placement": out.get("placement"),
                 **({"distributed": dist_info} if dist_info else {})},
        "recipe": resolved.get("recipe"),
        "method_info": out["prepare"],
        "resumed": out["resumed"],
        "checkpoint_bytes": out["checkpoint_bytes"],
        "history": out["history"],
        "env": {"versions": env.versions(), "git": env.git_state(), "device": env.device_info(device)},
        "task_info": task.info,
        "overrides": list(overrides),
        "config": resolved,
    }
    if not main:
        return rec
    path = write_record(cfg.results.dir, rec)
    state.release(remove=True)
    logger.finish({metric: score, "ppt": rec["ppt"]})
    rec["_path"] = str(path)
    print(f"[{run_name}] {metric} {score:.2f}% | trained params {counts['trainable_params']:,} (+{counts['head_params']:,} head) "
          f"| PPT {rec['ppt']:.4f} | {rec['perf']['wall_s']:.1f}s | record {path}")
    return rec
