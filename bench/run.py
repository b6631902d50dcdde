"""One job: compose backbone × method × dataset, train, evaluate, write the record."""
from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone

import torch
from omegaconf import DictConfig, OmegaConf

from bench import env, kinds
from bench.imports import import_suite
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
    model = backbones.build(cfg.backbone, num_classes=int(cfg.dataset.num_classes),
                            drop_path=float(cfg.train.get("drop_path", 0.0)), device=device)
    method.apply(model)
    return model, method


def params_report(cfg: DictConfig) -> dict:
    model, method = build_model(cfg, device="meta")
    import backbones

    counts = count_params(model, backbones.head_of(model))
    return {"method": method.name, "backbone": cfg.backbone.name, "trainable_params": counts["trainable_params"],
            "head_params": counts["head_params"], "total_params": counts["total_params"]}


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    import_suite()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    if cfg.mode == "params":
        report = params_report(cfg)
        print(json.dumps(report))
        return report
    if cfg.mode != "train":
        raise ValueError(f"unknown mode={cfg.mode}; choose train or params")
    return train_job(cfg, overrides or [])


def train_job(cfg: DictConfig, overrides: list[str]) -> dict:
    import backbones
    import datasets
    from bench.engine import train_and_evaluate
    from bench.loggers import build_logger
    from bench.results import write_record

    t_start = time.perf_counter()
    device = env.resolve_device(str(cfg.device))
    seed_everything(int(cfg.seed))
    b = cfg.backbone
    kinds.get(str(cfg.dataset.get("kind", "image_cls"))).check_backbone(str(b.family), b.name, cfg.dataset.name)
    task = datasets.build(cfg.dataset, image_size=int(b.img_size), mean=list(b.mean), std=list(b.std))
    if task.num_classes != int(cfg.dataset.num_classes):
        raise ValueError(f"dataset.num_classes={cfg.dataset.num_classes} but {task.name} has {task.num_classes} classes")
    seed_everything(int(cfg.seed))
    model, method = build_model(cfg, device="cpu")
    counts = count_params(model, backbones.head_of(model))
    variant = method_variant(overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_name = f"{method.name}{'[' + variant + ']' if variant else ''}/{task.name}/{b.name}/seed{cfg.seed}"
    logger = build_logger(cfg.get("logger", "none"), resolved, run_name)
    log.info("run %s on %s: %d trainable params (+%d head)", run_name, device, counts["trainable_params"], counts["head_params"])

    if cfg.get("recipe"):
        log.info("recipe for %s on %s: %s", method.name, task.name, cfg.recipe.get("source", "?"))
    else:
        log.warning("no recipe for method %s on dataset %s (no conf/recipe/%s/%s.yaml): using the method's "
                    "defaults", method.name, task.name, method.name, task.name)
    out = train_and_evaluate(model, method, task, cfg, device, logger)
    metric, score = out["metric"], out["score"]
    counts = count_params(model, backbones.head_of(model))  # after prepare (data-dependent methods)
    rec = {
        "schema": 1,
        "status": "ok",
        "run_id": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "benchmark": task.benchmark,
        "dataset": task.name,
        "backbone": b.name,
        "method": method.name,
        "variant": variant,
        "seed": int(cfg.seed),
        "kind": getattr(task, "kind", "image_cls"),
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
            **kinds.get(getattr(task, "kind", "image_cls")).protocol(task),
            "normalization": {"mean": list(task.mean), "std": list(task.std)},
            "optimizer": {k: resolved["train"].get(k) for k in ("optimizer", "lr", "weight_decay", "no_decay_1d")},
            "schedule": {k: resolved["train"].get(k) for k in ("epochs", "warmup_epochs", "warmup_lr", "min_lr")},
            "batch_size": int(cfg.train.batch_size),
            "label_smoothing": float(cfg.train.label_smoothing),
            "drop_path": effective_drop_path(model),
        },
        "perf": {"peak_mem_mb": out["peak_mem_mb"], "peak_mem_kind": out["peak_mem_kind"],
                 "train_images_per_s": out["train_images_per_s"], "train_s": out["train_s"],
                 "wall_s": time.perf_counter() - t_start, "steps": out["steps"]},
        "recipe": resolved.get("recipe"),
        "method_info": out["prepare"],
        "history": out["history"],
        "env": {"versions": env.versions(), "git": env.git_state(), "device": env.device_info(device)},
        "task_info": task.info,
        "overrides": list(overrides),
        "config": resolved,
    }
    path = write_record(cfg.results.dir, rec)
    logger.finish({metric: score, "ppt": rec["ppt"]})
    rec["_path"] = str(path)
    print(f"[{run_name}] {metric} {score:.2f}% | trained params {counts['trainable_params']:,} (+{counts['head_params']:,} head) "
          f"| PPT {rec['ppt']:.4f} | {rec['perf']['wall_s']:.1f}s | record {path}")
    return rec
