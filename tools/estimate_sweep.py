"""Sweep cost estimate: measured step times (``tools.bench_step``) × the recipes -> device-hours of a sweep.

    python -m tools.estimate_sweep                                  # --sweep vtab1k from results/step_time.md
    python -m tools.estimate_sweep --sweep all --seeds 3 --table results/step_time_cuda.json
    python -m tools.estimate_sweep --sweep fgvc --methods lora,adapter,full

Sweeps: ``vtab1k`` = every method with a measured step time × the 19 VTAB-1k tasks; ``fgvc`` = × the 5
FGVC datasets; ``all`` = both; each × ``--seeds`` seeds, final protocol (``eval.select=last``: train
on the trainval split, one evaluation of the test split).

Arithmetic, per (method, dataset), from the recipe ``conf/recipe/<method>/<dataset>.yaml`` (epochs,
batch size B; no recipe: ``conf/config.yaml``'s ``train.epochs``/``train.batch_size``, counted in the
table's "no recipe" column):

* per-image training time t = ms/step ÷ the measured batch (the step time is taken as linear in the
  batch size: a saturated device; small batches on a GPU are, if anything, cheaper per step than this);
* training = epochs × ceil(N_train / B) × B × t (the last partial batch counted as a full one);
* evaluation = N_test × t × ``--eval-factor`` (default 1/3: a forward is about a third of
  forward + backward + step);
* not counted: data decoding (cached once per dataset), data-dependent preparation (SPT/GPS/SCT),
  start-up, checkpoints.

Tables: the markdown ``tools.bench_step`` writes (its first table sets the device, backbone and batch;
a later table that also measured ``full`` is rescaled by the first table's ``full`` time, as the
ratios to ``full`` are what such a separate run compares) or its JSON sidecar (``--json``). Output:
``results/sweep_estimate_<sweep>.md``, titled as estimated from measured step times and naming the
device the step times were measured on (CPU-hours on a CPU, GPU-hours on a GPU).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SWEEPS = ("vtab1k", "fgvc", "all")
HEADER = re.compile(r"backbone `(?P<backbone>[^`]+)`, batch (?P<batch>\d+), (?P<px>\d+) px, device `(?P<device>[^`]+)`"
                    r"(?:, (?P<dtype>[^,]+))?(?:, (?P<threads>\d+) CPU threads)?")


# ----------------------------------------------------------------------------------------------
# step-time tables
# ----------------------------------------------------------------------------------------------
def parse_markdown(text: str) -> dict:
    """{"meta": {backbone, batch, img_size, device, dtype, threads}, "ms": {method: ms/step}, "notes": [...]}."""
    meta: dict = {}
    tables: list[dict[str, float]] = []
    current: Optional[dict[str, float]] = None
    for line in text.splitlines():
        m = HEADER.search(line)
        if m and not meta:
            meta = {"backbone": m["backbone"], "batch": int(m["batch"]), "img_size": int(m["px"]),
                    "device": m["device"], "dtype": (m["dtype"] or "").strip() or None,
                    "threads": int(m["threads"]) if m["threads"] else None}
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            current = None
            continue
        if cells[0] == "method" or set(cells[0]) <= set("-: "):
            if cells[0] == "method":
                current = {}
                tables.append(current)
            continue
        if current is None or len(cells) < 3:
            continue
        try:
            current[cells[0]] = float(cells[2].replace(",", ""))
        except ValueError:  # a failed method ("failed: ...")
            continue
    if not meta or not tables:
        raise ValueError("not a tools.bench_step table: no '- backbone `...`, batch N, P px, device `...`' line "
                         "or no '| method | ... | ms/step |' table")
    ms, notes = dict(tables[0]), []
    for i, t in enumerate(tables[1:], 2):
        new = {k: v for k, v in t.items() if k not in ms}
        if not new:
            continue
        if "full" in t and "full" in tables[0]:
            scale = tables[0]["full"] / t["full"]
            ms.update({k: v * scale for k, v in new.items()})
            notes.append(f"table {i} ({', '.join(sorted(new))}): rescaled ×{scale:.3f} to the first table's `full`")
        else:
            ms.update(new)
            notes.append(f"table {i} ({', '.join(sorted(new))}): taken as measured (no `full` to rescale by)")
    return {"meta": meta, "ms": ms, "notes": notes}


def load_table(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step-time table {path} not found: run `python -m tools.bench_step` first")
    if path.suffix == ".json":
        d = json.loads(path.read_text())
        ok = [r for r in d["results"] if "error" not in r]
        meta = dict(d["meta"])
        return {"meta": meta, "ms": {r["method"]: float(r["ms_per_step"]) for r in ok}, "notes": []}
    return parse_markdown(path.read_text())


# ----------------------------------------------------------------------------------------------
# datasets and recipes
# ----------------------------------------------------------------------------------------------
def sweep_datasets(sweep: str) -> dict[str, tuple[int, int]]:
    """dataset config name -> (final-protocol training images, test images)."""
    from datasets import fgvc, vtab

    out: dict[str, tuple[int, int]] = {}
    if sweep in ("vtab1k", "all"):
        for task, (_, _, test) in vtab.VTAB_TASKS.items():
            out[f"vtab/{task}"] = (vtab.SPLIT_SIZES["train800val200"], test)
    if sweep in ("fgvc", "all"):
        for key, spec in fgvc.FGVC_DATASETS.items():
            train, _, test = spec[4]  # default roles: the final run trains on train.json (like VPT and V-PETL)
            out[f"fgvc/{key}"] = (train, test)
    if not out:
        raise ValueError(f"unknown sweep {sweep!r}; choose one of {', '.join(SWEEPS)}")
    return out


def recipe(method: str, dataset: str, conf_dir: Path) -> tuple[int, int, bool]:
    """(epochs, batch size, from a recipe?) of ``method`` on ``dataset``."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(conf_dir / "config.yaml").train
    path = conf_dir / "recipe" / method / f"{dataset}.yaml"
    if not path.is_file():
        return int(base.epochs), int(base.batch_size), False
    t = OmegaConf.load(path).get("train") or {}
    return int(t.get("epochs", base.epochs)), int(t.get("batch_size", base.batch_size)), True


# ----------------------------------------------------------------------------------------------
# the estimate
# ----------------------------------------------------------------------------------------------
def estimate(table: dict, datasets: dict[str, tuple[int, int]], seeds: int = 3, eval_factor: float = 1 / 3,
             methods: Optional[list[str]] = None, recipe_of=None) -> dict:
    """Hours per method and in total; ``recipe_of(method, dataset) -> (epochs, batch, from_recipe)``."""
    batch0 = int(table["meta"]["batch"])
    names = methods or sorted(table["ms"])
    missing = [m for m in names if m not in table["ms"]]
    if missing:
        raise ValueError(f"no step time for {', '.join(missing)} in the table (measured: {', '.join(sorted(table['ms']))})")
    rows = []
    for m in names:
        t_img = table["ms"][m] / 1000.0 / batch0  # seconds per training image
        train_s = eval_s = 0.0
        images = 0
        no_recipe = 0
        for d, (n_train, n_test) in datasets.items():
            epochs, bs, from_recipe = recipe_of(m, d)
            no_recipe += not from_recipe
            seen = epochs * math.ceil(n_train / bs) * bs
            images += seen * seeds
            train_s += seen * t_img * seeds
            eval_s += n_test * t_img * eval_factor * seeds
        rows.append({"method": m, "ms_per_step": table["ms"][m], "runs": len(datasets) * seeds, "no_recipe": no_recipe,
                     "train_images": images, "train_h": train_s / 3600, "eval_h": eval_s / 3600,
                     "total_h": (train_s + eval_s) / 3600})
    return {"rows": rows, "total_h": sum(r["total_h"] for r in rows), "runs": sum(r["runs"] for r in rows),
            "datasets": len(datasets), "seeds": seeds}


def hours_unit(device: str) -> str:
    return "GPU-hours" if str(device).startswith("cuda") else "CPU-hours"


def render(est: dict, table: dict, sweep: str, source: str, eval_factor: float) -> str:
    meta = table["meta"]
    unit = hours_unit(meta["device"])
    where = f"`{meta['device']}`" + (f" ({meta['threads']} CPU threads)" if meta.get("threads") and
                                      not str(meta["device"]).startswith("cuda") else "")
    if meta.get("device_name"):
        where += f" {meta['device_name']}"
    lines = [
        f"# Sweep `{sweep}`: {unit}, estimated from measured step times",
        "",
        f"- **Estimated from measured step times**, not from timed runs: `{source}` (backbone `{meta.get('backbone', '?')}`, "
        f"batch {meta['batch']}, {meta.get('img_size', '?')} px, {meta.get('dtype') or '?'}), measured on {where}; "
        f"hours are **{unit}** of that device.",
        f"- {est['datasets']} datasets × {est['seeds']} seeds per method, final protocol (train on trainval, one test "
        f"evaluation); epochs and batch size from `conf/recipe/<method>/<dataset>.yaml` (no recipe: "
        f"`conf/config.yaml`'s train defaults, counted in *no recipe*).",
        f"- training = epochs × ceil(N/B) × B × (ms/step ÷ {meta['batch']}); evaluation = N_test × the same per-image "
        f"time × {eval_factor:.3g}; not counted: decoding, data-dependent preparation, start-up (see "
        "`tools/estimate_sweep.py`).",
        *[f"- {n}" for n in table.get("notes", [])],
        f"- written {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} by `python -m tools.estimate_sweep "
        f"--sweep {sweep} --seeds {est['seeds']}`",
        "",
        f"| method | ms/step (batch {meta['batch']}) | runs | no recipe | train images | train h | eval h | total {unit} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(est["rows"], key=lambda r: -r["total_h"]):
        lines.append(f"| {r['method']} | {r['ms_per_step']:.1f} | {r['runs']} | {r['no_recipe'] or ''} | "
                     f"{r['train_images']:,} | {r['train_h']:.1f} | {r['eval_h']:.1f} | {r['total_h']:.1f} |")
    lines.append(f"| **total** | | {est['runs']} | | {sum(r['train_images'] for r in est['rows']):,} | "
                 f"{sum(r['train_h'] for r in est['rows']):.1f} | {sum(r['eval_h'] for r in est['rows']):.1f} | "
                 f"**{est['total_h']:.1f}** |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.estimate_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", default="vtab1k", choices=SWEEPS)
    p.add_argument("--table", default="results/step_time.md", help="tools.bench_step markdown table or its JSON")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", default=None, help="comma-separated (default: every method in the table)")
    p.add_argument("--eval-factor", type=float, default=1 / 3, help="evaluation cost per image ÷ training cost")
    p.add_argument("--out", default=None, help="default results/sweep_estimate_<sweep>.md")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    a = parse_args(argv)
    from bench import CONF_DIR
    from bench.results import write_text_atomic

    table = load_table(Path(a.table))
    datasets = sweep_datasets(a.sweep)
    methods = [s.strip() for s in a.methods.split(",") if s.strip()] if a.methods else None
    est = estimate(table, datasets, a.seeds, a.eval_factor, methods,
                   recipe_of=lambda m, d: recipe(m, d, Path(CONF_DIR)))
    out = Path(a.out or f"results/sweep_estimate_{a.sweep}.md")
    write_text_atomic(out, render(est, table, a.sweep, a.table, a.eval_factor))
    unit = hours_unit(table["meta"]["device"])
    print(f"{a.sweep}: {est['runs']} runs, {est['total_h']:.1f} {unit} (estimated from measured step times on "
          f"{table['meta']['device']}); wrote {out}")
    return 0


if __name__ == "__main__":
    from bench.cli import friendly_errors

    with friendly_errors():
        sys.exit(main())
