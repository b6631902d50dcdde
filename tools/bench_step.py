"""Step-time benchmark: forward + backward + optimizer step of every method on one backbone and batch.

    python -m tools.bench_step                                   # every registered method, vit_b16, batch 32
    python -m tools.bench_step --methods full,linear,lora --steps 5 --warmup 2
    python -m tools.bench_step --backbone vit_micro --batch 64 --device cuda --out results/step_time_micro.md
    python -m tools.bench_step --set backbone.depth=2 --set backbone.embed_dim=32 ...   # any config override

What is timed: ``--steps`` training steps after ``--warmup`` untimed ones, on one fixed random batch
(images of the backbone's ``img_size``, random labels), in train mode, with the runner's optimizer
(AdamW over the method's parameter groups) and every method hook the engine calls. On CUDA the forward
runs under bf16 autocast (the runner's default ``train.amp``) and each step is synchronised; on CPU
it runs in fp32. The reported time is the median over the timed steps (the mean is in the JSON line).
Data-dependent methods (``needs_prepare``) are prepared first on ``--prepare-batches`` random batches
(not timed).

Memory: every method runs in a fresh Python subprocess (``--in-process`` runs them in this process,
for quick tests). On CUDA the column is ``torch.cuda.max_memory_allocated`` over the warm-up and timed
steps (the model, optimizer states, activations and gradients; the CUDA context is not included). On
CPU it is the growth of the process's peak resident set during the steps over its resident set
after the model was built and prepared: the kernel's high-water mark (VmHWM) is reset just before the
steps (``/proc/self/clear_refs``), so the column is VmHWM − RSS(baseline). Where the reset is not
possible the (coarser) ``ru_maxrss`` − baseline is reported and the memory column says so.

Output: a markdown table (``--out``, default ``results/step_time.md``, written atomically) with the
trainable parameters, ms/step, ratios to ``full`` and ``linear`` (when they were measured), and peak
memory; the same results as JSON beside it (``--json``, default the ``--out`` path with ``.json``: what
``tools.estimate_sweep --table`` reads); one JSON line per method on stdout. On a GPU:
``python -m tools.bench_step --device cuda --out results/step_time_cuda.md`` (bf16 autocast).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_TAG = "BENCH_STEP_RESULT "


# ----------------------------------------------------------------------------------------------
# measuring one method
# ----------------------------------------------------------------------------------------------
def _compose(backbone: str, method: str, num_classes: int, extra: list[str]):
    from hydra import compose, initialize_config_dir

    from bench import CONF_DIR

    overrides = [f"backbone={backbone}", f"method={method}", f"dataset.num_classes={num_classes}", *extra]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _rss_mb() -> Optional[float]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hwm_mb() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def measure(method: str, backbone: str, batch: int, steps: int, warmup: int, device_name: str,
            num_classes: int = 100, extra: Optional[list[str]] = None, prepare_batches: int = 2,
            seed: int = 0) -> dict:
    """Time ``steps`` training steps of ``method``; returns a result dict (see module docstring)."""
    import torch

    from bench import env
    from bench.imports import import_suite
    from bench.metrics import count_params
    from bench.optim import build_optimizer, default_param_groups
    from bench.run import build_model, seed_everything

    import_suite()
    import backbones

    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need --steps >= 1, --warmup >= 0 and --batch >= 1 (got {steps}, {warmup}, {batch})")
    cfg = _compose(backbone, method, num_classes, list(extra or []))
    device = env.resolve_device(device_name)
    seed_everything(seed)
    model, m = build_model(cfg, device="cpu")
    counts = count_params(model, backbones.head_of(model))
    size = int(cfg.backbone.img_size)
    g = torch.Generator().manual_seed(seed)
    if m.needs_prepare:
        from datasets.base import ImageTensorDataset, make_loader

        n = max(1, prepare_batches) * batch
        imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
        ds = ImageTensorDataset(imgs, torch.randint(0, num_classes, (n,), generator=g),
                                list(cfg.backbone.mean), list(cfg.backbone.std))
        m.prepare(model, make_loader(ds, batch, shuffle=False), torch.nn.CrossEntropyLoss())
        counts = count_params(model, backbones.head_of(model))
    model.to(device)
    model.train()
    tcfg = cfg.train
    groups = m.param_groups(model, float(tcfg.lr), float(tcfg.weight_decay)) or \
        default_param_groups(model, float(tcfg.weight_decay), bool(tcfg.get("no_decay_1d", False)))
    opt = build_optimizer(groups, tcfg)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def step():
        with autocast():
            logits = model(x)
            loss = m.training_loss(model, x, y, logits, loss_fn(logits, y))
        opt.zero_grad(set_to_none=True)
        m.before_backward(model, loss)
        loss.backward()
        m.after_backward(model)
        m.before_step(model, opt)
        opt.step()
        m.after_step(model, opt)

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem_kind = "cuda_max_allocated"
    else:
        base_rss = _rss_mb()
        mem_kind = "cpu_peak_rss_delta" if _reset_hwm() and _hwm_mb() is not None else "cpu_ru_maxrss_delta"
        base_ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1000.0)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    elif mem_kind == "cpu_peak_rss_delta":
        peak = max(0.0, (_hwm_mb() or 0.0) - (base_rss or 0.0))
    else:
        peak = max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 - max(base_ru, base_rss or 0.0))
    return {
        "method": method, "backbone": cfg.backbone.name, "batch": batch, "img_size": size,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "dtype": "bf16-autocast" if cuda else "fp32",
        "steps": steps, "warmup": warmup, "threads": torch.get_num_threads(),
        "trainable_params": counts["trainable_params"], "head_params": counts["head_params"],
        "ms_per_step": statistics.median(times), "ms_mean": statistics.fmean(times), "ms_all": times,
        "peak_mem_mb": peak, "mem_kind": mem_kind, "prepared": bool(m.needs_prepare),
    }


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def _worker_args(a: argparse.Namespace, method: str) -> list[str]:
    cmd = [sys.executable, "-m", "tools.bench_step", "--worker", method, "--backbone", a.backbone,
           "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup), "--device", a.device,
           "--num-classes", str(a.num_classes), "--prepare-batches", str(a.prepare_batches), "--seed", str(a.seed)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    for s in a.set or []:
        cmd += ["--set", s]
    return cmd


def run_one(a: argparse.Namespace, method: str) -> dict:
    if a.in_process:
        try:
            return measure(method, a.backbone, a.batch, a.steps, a.warmup, a.device, a.num_classes, a.set,
                           a.prepare_batches, a.seed)
        except Exception as e:  # noqa: BLE001  (one failing method must not stop the table)
            return {"method": method, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    proc = subprocess.run(_worker_args(a, method), cwd=ROOT, capture_output=True, text=True,
                          timeout=a.timeout if a.timeout else None)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
    return {"method": method, "error": err[:300]}


def _fmt_ratio(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.2f}×"


def render(results: list[dict], a: argparse.Namespace) -> str:
    ok = {r["method"]: r for r in results if "error" not in r}
    full = ok.get("full", {}).get("ms_per_step")
    lin = ok.get("linear", {}).get("ms_per_step")
    mem_full = ok.get("full", {}).get("peak_mem_mb")
    mem_lora = ok.get("lora", {}).get("peak_mem_mb")
    first = next(iter(ok.values()), {})
    mem_kinds = sorted({r["mem_kind"] for r in ok.values()})
    mem_text = {
        "cuda_max_allocated": "torch.cuda.max_memory_allocated over the steps (model + optimizer + activations)",
        "cpu_peak_rss_delta": "peak RSS during the steps (VmHWM, reset before them) minus RSS after building the model",
        "cpu_ru_maxrss_delta": "ru_maxrss after the steps minus RSS after building the model (coarse)",
    }
    lines = [
        "# Step time per method",
        "",
        f"- backbone `{a.backbone}`, batch {a.batch}, {first.get('img_size', '?')} px, device `{first.get('device', a.device)}`, "
        f"{first.get('dtype', '?')}, {first.get('threads', '?')} CPU threads",
        f"- {a.steps} timed steps after {a.warmup} warm-up steps; forward + backward + optimizer step (AdamW), "
        "median ms/step; " + ("all methods in one process (--in-process: memory not isolated between methods)"
                              if a.in_process else "each method in a fresh process"),
        "- memory: " + "; ".join(mem_text.get(k, k) for k in mem_kinds)
        + ("; † data-dependent method, prepared before the peak was reset: the steps may reuse memory that"
           " preparation freed, so its CPU growth can read low" if any(k.startswith("cpu") for k in mem_kinds)
           and any(r.get("prepared") for r in ok.values()) else ""),
        f"- written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}"
        + (f"; overrides: {' '.join(a.set)}" if a.set else ""),
        "",
        "| method | trainable params | ms/step | × full | × linear | peak mem (MiB) | mem × full | mem × lora |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | – | failed: {r['error'].replace('|', '/')} | | | | | |")
            continue
        ms = r["ms_per_step"]
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {ms:.1f} | {_fmt_ratio(ms / full if full else None)} | "
            f"{_fmt_ratio(ms / lin if lin else None)} | {r['peak_mem_mb']:.0f}"
            f"{' †' if r.get('prepared') and str(r.get('mem_kind', '')).startswith('cpu') else ''} | "
            f"{_fmt_ratio(r['peak_mem_mb'] / mem_full if mem_full else None)} | "
            f"{_fmt_ratio(r['peak_mem_mb'] / mem_lora if mem_lora else None)} |"
        )
    return "\n".join(lines) + "\n"


def to_json(results: list[dict], a: argparse.Namespace) -> str:
    """The table's facts for ``tools.estimate_sweep``: {"meta": {backbone, batch, img_size, device, ...}, "results"}."""
    first = next((r for r in results if "error" not in r), {})
    meta = {"backbone": a.backbone, "batch": a.batch, "img_size": first.get("img_size"),
            "device": first.get("device", a.device), "device_name": first.get("device_name"),
            "dtype": first.get("dtype"), "threads": first.get("threads"), "steps": a.steps, "warmup": a.warmup,
            "overrides": list(a.set or []),
            "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return json.dumps({"meta": meta, "results": results}, indent=1) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method)")
    p.add_argument("--backbone", default="vit_b16", help="backbone config name (conf/backbone/)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", default="results/step_time.md", help="markdown table path")
    p.add_argument("--json", default=None, help="machine-readable results for tools.estimate_sweep (default: --out "
                                               "with .json)")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--prepare-batches", type=int, default=2, help="random batches for data-dependent methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override (repeatable), e.g. --set backbone.depth=2")
    p.add_argument("--in-process", action="store_true", help="measure in this process (no per-method subprocess)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method subprocess")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    if a.worker:
        res = measure(a.worker, a.backbone, a.batch, a.steps, a.warmup, a.device, a.num_classes, a.set,
                      a.prepare_batches, a.seed)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    from bench.imports import import_suite
    from bench.registry import METHODS
    from bench.results import write_text_atomic

    import_suite()
    import methods  # noqa: F401  (registers every method)

    names = METHODS.names() if not a.methods else [s.strip() for s in a.methods.split(",") if s.strip()]
    for n in names:
        METHODS.get(n)  # unknown names: one-line error with the known ones
    results = []
    for n in names:
        r = run_one(a, n)
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "ms_all"}), flush=True)
    path = write_text_atomic(Path(a.out), render(results, a))
    jpath = write_text_atomic(Path(a.json) if a.json else Path(a.out).with_suffix(".json"), to_json(results, a))
    print(f"wrote {path} and {jpath}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    from bench.cli import friendly_errors

    with friendly_errors():
        sys.exit(main())
