"""Regenerate leaderboard markdown from every result record.

``python -m bench.leaderboard [results.dir=DIR]`` reads ``DIR/runs/**.json`` with pandas, aggregates seeds to
mean ± std (n), and writes ``DIR/<benchmark>/leaderboard.md`` with tabulate: one table per (backbone,
protocol), rows = methods (one row per budget/variant), columns = datasets, group means, mean, trainable
parameters (M, excluding the head) and PPT. Published reference numbers (``results/reference/*.csv``) are shown
beside reproduced ones when both exist. Output is deterministic: regenerating gives identical files.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from bench import ROOT, pareto
from bench.metrics import ppt
from bench.results import load_records, write_text_atomic

REFERENCE_DIR = ROOT / "results" / "reference"
KEYS = ["benchmark", "backbone", "select", "metric", "method", "variant", "dataset"]


def records_frame(results_dir: str | Path) -> pd.DataFrame:
    rows = []
    for r in load_records(results_dir):
        if r.get("status") != "ok":
            continue
        proto = r.get("protocol", {})
        ds_cfg = (r.get("config") or {}).get("dataset") or {}
        perf = r.get("perf") or {}
        main = r.get("metric") or "top1"
        # the task's headline metrics (COCO: box AP and mask AP): one table each; the record's metric first
        shown = [main] + [m for m in ds_cfg.get("leaderboard_metrics") or [] if m != main]
        for metric in shown:
            score = (r.get("metrics") or {}).get(metric, r.get("score", r.get("top1")) if metric == main else None)
            if score is None:
                continue
            rows.append({
                "benchmark": r["benchmark"], "backbone": r["backbone"], "select": proto.get("select", "last"),
                "method": r["method"], "variant": r.get("variant") or "", "dataset": r["dataset"].split("/")[-1],
                "group": ds_cfg.get("group"), "seed": int(r["seed"]), "metric": metric, "score": float(score),
                "params": int(r["trainable_params"]), "select_score": proto.get("select_score"),
                "train_split": proto.get("train_split"), "eval_split": proto.get("eval_split"),
                "created": r.get("created", ""), "run_id": r.get("run_id", ""),
                "epochs": (proto.get("schedule") or {}).get("epochs"),
                "views": proto.get("views", 1),
                "config_hash": r.get("config_hash") or "",
                "kind": r.get("kind", "image_cls"),
                "mem_mb": perf.get("peak_mem_mb"), "mem_kind": perf.get("peak_mem_kind"),
            })
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["epochs"] = df["epochs"].fillna(-1).astype(int)
    # a re-run of the same configuration (same config hash; else same keys, schedule and seed) replaces the older
    df = df.sort_values(["created", "run_id"])
    hashed = df["config_hash"] != ""
    df = pd.concat([df[hashed].drop_duplicates(["config_hash", "metric"], keep="last"), df[~hashed]]).sort_values(["created", "run_id"])
    df = df.drop_duplicates(KEYS + ["epochs", "seed"], keep="last")
    return label_schedules(df).reset_index(drop=True)


def failed_runs(results_dir: str | Path) -> list[dict]:
    """Failed records whose configuration has no successful record (newest first per config hash)."""
    recs = load_records(results_dir)
    ok = {r.get("config_hash") for r in recs if r.get("status") == "ok" and r.get("config_hash")}
    seen, out = set(), []
    for r in sorted(recs, key=lambda r: (r.get("created", ""), r.get("run_id", "")), reverse=True):
        h = r.get("config_hash")
        if r.get("status") != "failed" or (h and (h in ok or h in seen)):
            continue
        seen.add(h)
        out.append(r)
    return sorted(out, key=lambda r: (r.get("benchmark", ""), r.get("method", ""), r.get("dataset", ""), r.get("seed", 0),
                                      r.get("run_id", "")))


def failed_section(failed: list[dict], results_dir: str | Path) -> list[str]:
    if not failed:
        return []
    rows = []
    for r in failed:
        f = r.get("failure") or {}
        rows.append([r.get("method", "?") + (f" [{r['variant']}]" if r.get("variant") else ""),
                     str(r.get("dataset", "?")).split("/")[-1], r.get("backbone", "?"), r.get("seed"),
                     f.get("reason", "?"), f.get("epoch"), f.get("step"),
                     str(Path(r["_path"]).relative_to(Path(results_dir))) if r.get("_path") else ""])
    md = tabulate(rows, headers=["method", "dataset", "backbone", "seed", "reason", "epoch", "step", "record"],
                  tablefmt="github")
    return ["## Failed runs", "", "Not in any mean above (status failed; the record holds the message).", "", md, ""]


def label_schedules(df: pd.DataFrame) -> pd.DataFrame:
    """Runs of one method variant under different epoch counts (the default job's 10 epochs beside a
    sweep's 3) are different rows: their variant gets ``<n> ep`` appended, never mixed into one mean."""
    df = df.copy()
    key = ["benchmark", "backbone", "select", "metric", "method", "variant"]
    several = df.groupby(key)["epochs"].transform("nunique") > 1
    tag = df["epochs"].map(lambda e: f"{e} ep" if e >= 0 else "? ep")
    df.loc[several, "variant"] = [f"{v},{t}" if v else t for v, t in zip(df.loc[several, "variant"], tag[several])]
    return df


def fmt_cell(mean: float, std: float, n: int) -> str:
    if n <= 1 or math.isnan(std):
        return f"{mean:.1f} (n={n})"
    return f"{mean:.1f} ± {std:.1f} (n={n})"


def benchmark_definition(benchmark: str) -> tuple[list[str], dict[str, list[str]]]:
    """(canonical dataset order, groups) where the benchmark defines them, else empty."""
    try:
        import datasets

        return list(datasets.benchmark_order(benchmark)), dict(datasets.benchmark_groups(benchmark))
    except Exception:  # noqa: BLE001  (ordering is cosmetic; records alone still render)
        return [], {}


def dataset_order(benchmark: str, names: list[str]) -> list[str]:
    """Canonical column order where the benchmark defines one, else alphabetical."""
    order, _ = benchmark_definition(benchmark)
    known = [n for n in order if n in names]
    return known + sorted(n for n in names if n not in known)


def mean_cell(values: list[float], expected: int) -> str:
    """Mean of the values present; '*' when fewer than the benchmark defines."""
    if not values:
        return ""
    return f"{sum(values) / len(values):.1f}" + ("" if len(values) >= expected else "*")


def load_reference(benchmark: str, backbone: str, metric: str = "top1") -> pd.DataFrame:
    """Published numbers: CSV rows (benchmark, backbone, method, dataset, top1, params, source); a table of
    another metric has a ``metric`` column (rows without one are top1) and the value in ``top1``'s place
    or in a ``score`` column."""
    frames = []
    for p in sorted(REFERENCE_DIR.glob("*.csv")) if REFERENCE_DIR.is_dir() else []:
        df = pd.read_csv(p, comment="#")
        need = {"benchmark", "backbone", "method", "dataset"}
        if not need.issubset(df.columns) or not {"top1", "score"} & set(df.columns):
            raise ValueError(f"reference table {p} lacks columns {sorted(need - set(df.columns))} or top1/score")
        if "metric" not in df.columns:
            df["metric"] = "top1"
        if "score" not in df.columns:
            df["score"] = df["top1"]
        frames.append(df)
    if not frames:
        return pd.DataFrame()
    ref = pd.concat(frames, ignore_index=True)
    ref["metric"] = ref["metric"].fillna("top1")
    return ref[(ref["benchmark"] == benchmark) & (ref["backbone"] == backbone) & (ref["metric"] == metric)]


def val_selected_rows(sub: pd.DataFrame) -> pd.DataFrame:
    """For best_val runs of a method with several variants: per dataset and seed, the variant with the best
    validation score (ties: fewer parameters); rows labelled '<method> [variant chosen on val]'."""
    out = []
    for method, g in sub.groupby("method"):
        if g["variant"].nunique() < 2 or g["select_score"].isna().all():
            continue
        g = g.sort_values(["select_score", "params"], ascending=[False, True])
        best = g.groupby(["dataset", "seed"], as_index=False).head(1).copy()
        best["chosen"] = best["variant"]
        best["variant"] = "variant chosen on val"
        out.append(best)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def table(sub: pd.DataFrame, benchmark: str, backbone: str) -> tuple[str, list[str]]:
    """Markdown table for one (benchmark, backbone, protocol) and footnotes."""
    datasets = dataset_order(benchmark, sorted(sub["dataset"].unique()))
    full_order, groups = benchmark_definition(benchmark)
    if not groups:  # groups named by the records' dataset configs
        for ds, grp in sub.drop_duplicates("dataset")[["dataset", "group"]].itertuples(index=False):
            if isinstance(grp, str) and grp:
                groups.setdefault(grp, []).append(ds)
    expected = max(len(full_order), len(datasets))
    notes = []
    extra = val_selected_rows(sub) if sub["select"].iloc[0] == "best_val" else pd.DataFrame()
    both = pd.concat([sub, extra], ignore_index=True) if not extra.empty else sub
    agg = both.groupby(["method", "variant", "dataset"]).agg(
        mean=("score", "mean"), std=("score", "std"), n=("score", "size"), params=("params", "mean"))
    memory = shows_memory(sub)
    if memory:
        mem = both.groupby(["method", "variant"])["mem_mb"].mean()
        kinds_ = sorted(set(sub["mem_kind"].dropna()))
        what = {"cuda_max_allocated": "cuda_max_allocated (torch.cuda.max_memory_allocated, as the anchors' Memory "
                                      "column)",
                "cpu_max_rss": "cpu_max_rss (the process's peak resident set on a CPU run: not comparable with GPU "
                               "numbers)"}
        notes.append("memory (MB): peak training memory, mean over runs; measured as "
                     + "; ".join(what.get(k, k) for k in kinds_) if kinds_ else "memory (MB): not recorded")
    rows = []
    for (method, variant), g in agg.groupby(level=[0, 1]):
        g = g.droplevel([0, 1])
        label = method + (f" [{variant}]" if variant else "")
        row = {"method": label}
        for ds in datasets:
            row[ds] = fmt_cell(g.loc[ds, "mean"], g.loc[ds, "std"], int(g.loc[ds, "n"])) if ds in g.index else ""
        for grp, members in sorted(groups.items()):
            row[f"{grp} mean"] = mean_cell([g.loc[d, "mean"] for d in members if d in g.index], len(members))
        mean = float(g["mean"].mean())
        params = float(g["params"].mean())
        row["mean"] = mean_cell(list(g["mean"]), expected)
        row["params (M)"] = f"{params / 1e6:.3f}" if params >= 1e5 else f"{params / 1e6:.4f}"
        row["PPT"] = "-" if method == "full" else f"{ppt(mean / 100.0, params):.2f}"
        if memory:
            m = mem.get((method, variant))
            row["memory (MB)"] = "" if m is None or pd.isna(m) else f"{m:,.0f}"
        rows.append((params, label, row))
        if variant == "variant chosen on val":
            chosen = extra[extra["method"] == method].sort_values(["dataset", "seed"])
            picks = ", ".join(f"{d}: {'/'.join(sorted(set(c['chosen'])))}" for d, c in chosen.groupby("dataset"))
            notes.append(f"{label}: {picks}")
    ref = load_reference(benchmark, backbone, str(sub["metric"].iloc[0]))
    for method, g in ref.groupby("method") if not ref.empty else []:
        g = g.drop_duplicates("dataset").set_index("dataset")
        row = {"method": f"{method} (published)"}
        for ds in datasets:
            if ds in g.index:
                val = float(g.loc[ds, "score"])
                ours = agg.loc[(method, "", ds), "mean"] if (method, "", ds) in agg.index else None
                row[ds] = f"{val:.1f}" + (f" (Δ {ours - val:+.1f})" if ours is not None else "")
            else:
                row[ds] = ""
        for grp in sorted(groups):  # published group means (e.g. SPT/SNELL report only those)
            key = f"mean_{grp}"
            row[f"{grp} mean"] = f"{float(g.loc[key, 'score']):.1f}" if key in g.index else ""
        row["mean"] = f"{float(g.loc['mean', 'score']):.1f}" if "mean" in g.index else ""
        p = g["params"].dropna() if "params" in g.columns else pd.Series(dtype=float)
        row["params (M)"] = f"{float(p.iloc[0]):.3f}" if len(p) else ""
        # the anchors' PPT from their own mean and parameter count (Full has none)
        at = "mean" if "mean" in g.index else datasets[0] if len(datasets) == 1 and datasets[0] in g.index else None
        row["PPT"] = f"{ppt(float(g.loc[at, 'score']) / 100.0, float(p.iloc[0]) * 1e6):.2f}" \
            if at is not None and method != "full" and len(p) else ""
        if memory:
            mm = g["memory_mb"].dropna() if "memory_mb" in g.columns else pd.Series(dtype=float)
            row["memory (MB)"] = f"{float(mm.iloc[0]):,.0f} (published)" if len(mm) else ""
        sources = sorted(set(g["source"].dropna())) if "source" in g.columns else []
        if sources:
            notes.append(f"{method} (published): {'; '.join(sources)}")
        rows.append((math.inf, row["method"], row))
    rows.sort(key=lambda t: (t[0], t[1]))
    body = [r for _, _, r in rows]
    headers = list(body[0].keys()) if body else []
    return tabulate([[r.get(h, "") for h in headers] for r in body], headers=headers, tablefmt="github",
                    disable_numparse=True), notes


DENSE_KINDS = ("detection", "segmentation")


def shows_memory(sub: pd.DataFrame) -> bool:
    """Dense tables carry the anchors' Memory column (spec video_dense.md sec. B4)."""
    return "kind" in sub.columns and sub["kind"].isin(DENSE_KINDS).any()


METRIC_NAMES = {"top1": "top-1 %", "top5": "top-5 %", "box_ap": "box AP", "mask_ap": "mask AP",
                "box_ap50": "box AP50", "miou": "mIoU %"}


def metric_names(df: pd.DataFrame) -> str:
    return " / ".join(METRIC_NAMES.get(m, m) for m in sorted(df["metric"].unique()))


def render(df: pd.DataFrame, benchmark: str, failed: list[dict] | None = None, results_dir: str | Path = ".") -> str:
    sub_all = df[df["benchmark"] == benchmark]
    lines = [f"# Leaderboard: {benchmark}", "",
             "Generated by `python -m bench.leaderboard` from the records under `runs/`; do not edit by hand.",
             f"Cells: {metric_names(sub_all)} mean ± std over seeds (n = seeds). params: trainable parameters excluding the head, "
             "mean over datasets. mean: arithmetic mean over datasets; group means likewise. "
             "PPT = mean·exp(−log10(params/1e7 + 1)). * = mean over fewer datasets than the benchmark defines.", ""]
    for (backbone, select, metric), sub in sorted(sub_all.groupby(["backbone", "select", "metric"])):
        splits = sub[["train_split", "eval_split"]].drop_duplicates()
        split_txt = "; ".join(f"train on {a} → evaluate on {b}" for a, b in splits.itertuples(index=False))
        tag = " — TEST-SELECTED (best test epoch; only for comparison with the anchors)" if select == "best_test" else ""
        epochs = sorted(e for e in sub["epochs"].unique() if e >= 0)
        ep_txt = f" Epochs: {', '.join(map(str, epochs))}." if epochs else ""
        views = sorted({int(v) for v in sub["views"].dropna().unique()}) if "views" in sub else []
        view_txt = f" Views per test example: {', '.join(map(str, views))} (logits averaged)." if views and views != [1] else ""
        lines += [f"## backbone {backbone} · protocol eval.select={select}{tag} · metric {metric}", "",
                  f"Splits: {split_txt}.{ep_txt}{view_txt}", ""]
        md, notes = table(sub, benchmark, backbone)
        lines += [md, ""]
        lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += failed_section([r for r in failed or [] if r.get("benchmark") == benchmark], results_dir)
    return "\n".join(lines).rstrip() + "\n"


def regenerate(results_dir: str | Path) -> list[Path]:
    df = records_frame(results_dir)
    if df.empty:
        return []
    written = []
    failed = failed_runs(results_dir)
    for benchmark in sorted(df["benchmark"].unique()):
        path = Path(results_dir) / benchmark / "leaderboard.md"
        write_text_atomic(path, render(df, benchmark, failed, results_dir))
        written.append(path)
        for (backbone, select, metric), sub in sorted(df[df["benchmark"] == benchmark].groupby(["backbone", "select", "metric"])):
            suffix = "" if metric == "top1" else f"_{metric}"
            png = Path(results_dir) / benchmark / f"pareto_{backbone}_{select}{suffix}.png"
            if pareto.plot(method_points(sub), f"{benchmark} · {backbone} · eval.select={select}", png, metric):
                written.append(png)
    return written


def method_points(sub: pd.DataFrame) -> pd.DataFrame:
    """One point per method row: mean score over the datasets it ran (seed means first), mean params,
    and how many datasets that mean covers."""
    per_ds = sub.groupby(["method", "variant", "dataset"]).agg(score=("score", "mean"), params=("params", "mean"))
    pts = per_ds.groupby(level=[0, 1]).agg(score=("score", "mean"), params=("params", "mean"), datasets=("score", "size"))
    pts = pts.reset_index()
    pts["label"] = [m + (f" [{v}]" if v else "") for m, v in zip(pts["method"], pts["variant"])]
    return pts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.leaderboard", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="results.dir=DIR (same key as the runner)")
    ap.add_argument("--dir", default=None, help="results folder (default: results)")
    args = ap.parse_args(argv)
    results_dir = args.dir or "results"
    for o in args.overrides:
        key, _, value = o.partition("=")
        if key != "results.dir" or not value:
            ap.error(f"unknown argument '{o}': the only override is results.dir=DIR")
        results_dir = value
    if not (Path(results_dir) / "runs").is_dir():
        print(f"error: no records under {Path(results_dir) / 'runs'}: run `python -m bench` first "
              f"(or pass results.dir=DIR)", file=sys.stderr)
        return 2
    written = regenerate(results_dir)
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
