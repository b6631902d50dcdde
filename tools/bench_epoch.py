"""Epoch-time benchmark: one training epoch's wall time vs. the pure model time of the same steps.

    python -m tools.bench_epoch                        # CPU: vit_micro (32 px), lora, 1,000-image cache, batch 64
    python -m tools.bench_epoch --device cuda          # vit_b16 at 224, 1,000 images (VTAB-1k sized), bf16 autocast
    python -m tools.bench_epoch --device cuda --channels-last --compile
    python -m tools.bench_epoch --dataset synthetic/dsprites_loc --method bitfit   # a configured dataset's trainval split

What is timed, per data path (``--paths``; ``loader`` = the DataLoader path, ``device`` = the
``train.data_on_device`` path of ``bench/placement.py``):

* epoch: the engine's training loop over the training split (the loader from
  ``bench.placement.train_loader``, ``kind.to_device``, autocast, ``kind.train_loss``, ``loss.item()``,
  the method hooks, AdamW, the per-iteration schedule), synchronised at the end;
* pure model: the same number of steps with the same code on the same batches, built on the device
  beforehand, so nothing but forward + backward + step runs.

The ratio epoch / pure is the data path's overhead (goal ≤ 1.1×); *data only* (the loader iterated
alone, batches moved to the device) gives it a second way, 1 + data / pure, less sensitive to noise. One untimed warm-up epoch first;
then ``--repeats`` alternating (epoch, pure) pairs; the ratio uses the fastest of each (the repeat least
disturbed by other processes on a shared machine), the ratio of the medians is reported beside it. Default data: a VTAB-1k-sized
cache of ``--images`` random uint8 images at the backbone's resolution (``ImageTensorDataset``, the
synthetic tasks' and VTAB-1k's training split type). Rows go to ``results/epoch_time.json`` (merged:
a row replaces the earlier one with the same device/backbone/method/path/options) and the markdown
table ``--out`` (default ``results/epoch_time.md``) is rendered from all rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from bench import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(path: str, a: argparse.Namespace) -> dict:
    """Time one data path (``loader`` | ``device``); returns one result row."""
    import torch

    from bench import env, kinds, placement
    from bench.engine import autocast_factory
    from bench.imports import import_suite
    from bench.optim import build_optimizer, build_scheduler, default_param_groups
    from bench.run import build_model, seed_everything

    import_suite()
    import datasets
    from datasets.base import ImageTensorDataset, make_loader

    device = env.resolve_device(a.device)
    backbone = a.backbone or ("vit_b16" if device.type == "cuda" else "vit_micro")
    over = [f"backbone={backbone}", f"method={a.method}", f"train.batch_size={a.batch}",
            f"train.data_on_device={'true' if path == 'device' else 'false'}",
            f"train.channels_last={str(a.channels_last).lower()}", f"train.compile={a.compile or 'false'}",
            "progress=false", *(["dataset=" + a.dataset] if a.dataset != "random" else
                                [f"dataset.num_classes={a.num_classes}"]), *a.set]
    cfg = _compose(over)
    tcfg = cfg.train
    seed_everything(a.seed)
    size = int(cfg.backbone.img_size)
    if a.dataset == "random":
        g = torch.Generator().manual_seed(a.seed)
        imgs = torch.randint(0, 256, (a.images, 3, size, size), dtype=torch.uint8, generator=g)
        ds = ImageTensorDataset(imgs, torch.randint(0, a.num_classes, (a.images,), generator=g),
                                list(cfg.backbone.mean), list(cfg.backbone.std))
        kind_name = "image_cls"
    else:
        task = datasets.build(cfg.dataset, image_size=size, mean=list(cfg.backbone.mean), std=list(cfg.backbone.std))
        ds, kind_name = task.split("trainval"), getattr(task, "kind", "image_cls")
    kind = kinds.get(kind_name)
    seed_everything(a.seed)
    model, method = build_model(cfg, device="cpu")
    loss_fn = kind.loss_fn(tcfg)
    model.to(device)
    if method.needs_prepare:
        method.prepare(model, make_loader(ds, int(cfg.get("prepare_batch_size", 32)), shuffle=False), loss_fn)
        model.to(device)
    pinfo = placement.prepare_model(model, device, tcfg)
    loader, linfo = placement.train_loader(ds, a.batch, a.seed, device, tcfg, kind_name)
    groups = method.param_groups(model, float(tcfg.lr), float(tcfg.weight_decay)) or \
        default_param_groups(model, float(tcfg.weight_decay), bool(tcfg.get("no_decay_1d", False)))
    opt = build_optimizer(groups, tcfg)
    steps = len(loader)
    sched = build_scheduler(opt, tcfg, steps)
    autocast = autocast_factory(device, tcfg.get("amp"))
    clip = tcfg.get("clip_grad")
    counter = {"step": 0}
    model.train()

    def step(batch):  # the engine's loop body (bench/engine.py), minus the failure bookkeeping
        batch = kind.to_device(batch, device)
        with autocast() if autocast else contextlib.nullcontext():
            loss = kind.train_loss(model, batch, loss_fn, method)
        value = loss.item()
        opt.zero_grad(set_to_none=True)
        method.before_backward(model, loss)
        loss.backward()
        method.after_backward(model)
        if clip:
            torch.nn.utils.clip_grad_norm_([p for gr in opt.param_groups for p in gr["params"]], float(clip))
        method.before_step(model, opt)
        opt.step()
        method.after_step(model, opt)
        counter["step"] += 1
        sched.step_update(counter["step"])
        return value

    def timed(batches) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            step(batch)
        _sync(device)
        return time.perf_counter() - t0

    def epoch() -> float:
        return timed(loader)

    prebuilt = [tuple(t.to(device) for t in kind.to_device(b, device)) for b in loader]  # one epoch, on the device
    _sync(device)

    def pure() -> float:
        return timed(prebuilt)

    def data_only() -> float:  # the data path alone: iterate the loader, batches to the device, no model
        _sync(device)
        t0 = time.perf_counter()
        for batch in loader:
            kind.to_device(batch, device)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(max(0, a.warmup_epochs)):
        epoch()
    ep, pu, da = [], [], []
    for _ in range(max(1, a.repeats)):
        ep.append(epoch())
        pu.append(pure())
        da.append(data_only())
    e, p = min(ep), min(pu)  # the least-disturbed repeat (shared machines); medians are kept beside
    em, pm = statistics.median(ep), statistics.median(pu)
    return {
        "device": str(device), "device_name": env.device_info(device).get("name") if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "backbone": backbone, "method": a.method, "img_size": size,
        "images": len(ds), "batch": a.batch, "steps": steps, "path": "device" if linfo["data_on_device"] else "loader",
        "requested_path": path, "placement": {**linfo, **pinfo}, "dtype": "bf16-autocast" if autocast else "fp32",
        "channels_last": bool(a.channels_last), "compile": a.compile or None,
        "epoch_s": e, "pure_s": p, "ratio": e / p if p > 0 else math.nan, "epoch_all": ep, "pure_all": pu,
        "data_s": min(da), "data_all": da, "data_share": min(da) / p if p > 0 else math.nan,
        "epoch_median_s": em, "pure_median_s": pm, "ratio_median": em / pm if pm > 0 else math.nan,
        "images_per_s": len(ds) / e if e > 0 else None, "repeats": len(ep),
        "dataset": a.dataset, "overrides": list(a.set),
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _key(r: dict) -> tuple:
    return (r["device"], r["backbone"], r["method"], r["img_size"], r["images"], r["batch"], r["requested_path"],
            r["channels_last"], r["compile"], r.get("dataset"), tuple(r.get("overrides") or ()))


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    keys = {_key(r) for r in new}
    return [r for r in old if _key(r) not in keys] + list(new)


def render(rows: list[dict]) -> str:
    lines = [
        "# Epoch time vs. pure model time",
        "",
        "Written by `python -m tools.bench_epoch` (see its docstring). *epoch*: the engine's training loop over the",
        "training split, data path included; *pure*: the same steps on batches built on the device beforehand;",
        "ratio = epoch / pure (goal ≤ 1.1×), from the fastest of the alternating repeats (the least disturbed by other",
        "processes; the ratio of the medians beside it), after one warm-up epoch. *data only*: the same loader",
        "iterated with nothing else (batches to the device), so 1 + data / pure is the overhead the data path adds",
        "without the noise of timing two long loops on a shared machine. `loader` = the",
        "DataLoader path, `device` = `train.data_on_device` (bench/placement.py).",
        "",
        "| device | backbone | method | px | images | batch | steps | path | dtype | channels_last | compile "
        "| epoch s | pure s | ratio | ratio of medians | data only s | 1 + data / pure | img/s | repeats | written |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        dev = r["device"] if r["device"] != "cpu" else f"cpu ({r['threads']} threads)"
        if r.get("device_name") and r["device"] != "cpu":
            dev += f" {r['device_name']}"
        lines.append(
            f"| {dev} | {r['backbone']} | {r['method']} | {r['img_size']} | {r['images']} | {r['batch']} | "
            f"{r['steps']} | {r['path']} | {r['dtype']} | {'yes' if r['channels_last'] else 'no'} | "
            f"{r['compile'] or 'no'} | {r['epoch_s']:.3f} | {r['pure_s']:.3f} | {r['ratio']:.3f}× | "
            f"{r.get('ratio_median', math.nan):.3f}× | {r.get('data_s', math.nan):.3f} | "
            f"{1 + r.get('data_share', math.nan):.3f}× | "
            f"{r['images_per_s']:.0f} | {r['repeats']} | {r['written'][:10]} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_epoch", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backbone", default=None, help="default: vit_b16 on CUDA, vit_micro on CPU")
    p.add_argument("--method", default="lora")
    p.add_argument("--dataset", default="random",
                   help="random (a uint8 cache of --images random images) or a dataset config name (its trainval split)")
    p.add_argument("--images", type=int, default=1000, help="random cache size (VTAB-1k: 1,000)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--paths", default="loader,device", help="comma-separated: loader, device")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", default=None, help="torch.compile backend (e.g. inductor); default off")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    p.add_argument("--out", default="results/epoch_time.md")
    p.add_argument("--json", default=None, help="rows file (default: --out with .json)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    import torch

    from bench.results import write_text_atomic

    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for path in [s.strip() for s in a.paths.split(",") if s.strip()]:
        if path not in ("loader", "device"):
            raise SystemExit(f"error: --paths: unknown path {path!r}; choose loader, device")
        r = measure(path, a)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("epoch_all", "pure_all", "data_all")}), flush=True)
        print(f"[{r['device']} {r['backbone']} {r['method']} {r['path']}] epoch {r['epoch_s']:.3f}s, "
              f"pure model {r['pure_s']:.3f}s: {r['ratio']:.3f}x; data only {r['data_s']:.3f}s: "
              f"1 + data/pure = {1 + r['data_share']:.3f}x", flush=True)
    out = Path(a.out)
    jpath = Path(a.json) if a.json else out.with_suffix(".json")
    old = json.loads(jpath.read_text()) if jpath.is_file() else []
    allrows = merge_rows(old, rows)
    write_text_atomic(jpath, json.dumps(allrows, indent=1) + "\n")
    write_text_atomic(out, render(allrows))
    print(f"wrote {out} and {jpath}")
    return 0


if __name__ == "__main__":
    from bench.cli import friendly_errors

    with friendly_errors():
        sys.exit(main())
