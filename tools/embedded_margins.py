"""Is the embedded default a transfer experiment? Three arms on ``synthetic/dsprites_loc`` with ``vit_micro``
(``--task video``: ``synthetic/moving_dsprites`` with ``video_micro``, the inflated ``vit_micro``), 3 seeds each,
through the runner exactly as ``python -m bench`` runs them:

* ``linear`` on a random-init ``vit_micro`` (``backbone.checkpoint=null``),
* ``linear`` on the FractalDB-pretrained ``vit_micro`` (the default checkpoint),
* ``lora`` on the pretrained ``vit_micro`` (the default job).

The claim checked: pretrained linear > random linear, and lora > pretrained linear, each by a margin
(difference of the means) larger than the std over the seeds (sample std, ddof 1) of either arm.

    python -m tools.embedded_margins                 # writes results/embedded/margins.md (about 4 min)
    python -m tools.embedded_margins --task video    # writes results/embedded_video/margins.md
    python -m tools.embedded_margins --set train.epochs=2 --out /tmp/m.md
    python -m tools.embedded_margins --task dense    # results/embedded_dense/margins.md (shapes_det + shapes_seg)

``--task dense``: ``swin_micro`` (FractalDB-pretrained, ``backbone.checkpoint=null`` for random) on
``synthetic/shapes_det`` (box AP) and ``synthetic/shapes_seg`` (mIoU), four arms each — linear (frozen backbone,
trainable decoder) and lora, each on a random and on the pretrained backbone — with the embedded dense schedule
(``DENSE_TRAIN``, the lora recipe's values, given to every arm); claims: pretrained > random for both methods.

Records go to a scratch results folder (``--records``, default a temporary one) so the random-init arm
never mixes with the pretrained ``vit_micro`` rows of the embedded leaderboard. ``--shared-records DIR``
(e.g. ``results``) runs the pretrained arms — exactly the leaderboard's configurations — in DIR with
``skip_done=true``: records already there (same config hash) are reused, new ones join the leaderboard.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

ARMS = (
    ("linear, random init", ["method=linear", "backbone.checkpoint=null"]),
    ("linear, pretrained", ["method=linear"]),
    ("lora, pretrained", ["method=lora"]),
)
CLAIMS = ((1, 0), (2, 1))  # (better arm, worse arm) indices into ARMS
IMAGE_ARMS, IMAGE_CLAIMS = ARMS, CLAIMS
TASKS = {  # --task: (dataset, backbone, default output under results/)
    "image": ("synthetic/dsprites_loc", "vit_micro", "embedded/margins.md"),
    "video": ("synthetic/moving_dsprites", "video_micro", "embedded_video/margins.md"),
    "dense": ("synthetic/shapes_det", "swin_micro", "embedded_dense/margins.md"),
}
DENSE_DATASETS = ("synthetic/shapes_det", "synthetic/shapes_seg")
# the embedded dense schedule: conf/recipe/lora/synthetic/shapes_{det,seg}.yaml, given to every method
DENSE_TRAIN = ["train.epochs=6", "train.batch_size=16", "train.lr=3e-3", "train.weight_decay=1e-4",
               "eval.batch_size=64"]
DENSE_ARMS = (
    ("linear, random init", ["method=linear", "backbone.checkpoint=null", *DENSE_TRAIN]),
    ("linear, pretrained", ["method=linear", *DENSE_TRAIN]),
    ("lora, random init", ["method=lora", "backbone.checkpoint=null", *DENSE_TRAIN]),
    ("lora, pretrained", ["method=lora", *DENSE_TRAIN]),
)
DENSE_CLAIMS = ((1, 0), (3, 2))
# video: the default job (lora) on the inflated pretrained video_micro vs on a random one, and vs chance
VIDEO_ARMS = (("lora, random init", ["method=lora", "backbone.checkpoint=null"]), ("lora, pretrained", ["method=lora"]))
VIDEO_CLAIMS = ((1, 0),)


def use_task(task: str) -> None:
    """Select the arms and claims of ``task`` (module-level, as ``check``/``render`` read them)."""
    global ARMS, CLAIMS
    ARMS, CLAIMS = {"video": (VIDEO_ARMS, VIDEO_CLAIMS), "dense": (DENSE_ARMS, DENSE_CLAIMS)}.get(
        task, (IMAGE_ARMS, IMAGE_CLAIMS))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def check(scores: dict[str, list[float]], chance: float | None = None) -> list[dict]:
    """One row per claim: the two arms, the margin, the larger std, whether margin > std; with ``chance``
    (top-1 % of guessing) also the last arm (the default job) against chance."""
    names = [a for a, _ in ARMS]
    rows = []
    if chance is not None:
        m, sd = mean_std(scores[names[-1]])
        rows.append({"better": names[-1], "worse": f"chance ({chance:.2f} %)", "margin": m - chance, "std": sd,
                     "holds": m - chance > sd})
    for hi, lo in CLAIMS:
        (mh, sh), (ml, sl) = mean_std(scores[names[hi]]), mean_std(scores[names[lo]])
        rows.append({"better": names[hi], "worse": names[lo], "margin": mh - ml, "std": max(sh, sl),
                     "holds": mh - ml > max(sh, sl)})
    return rows


def render(scores: dict[str, list[float]], seeds: list[int], extra: list[str], seconds: float, data: str,
           task: str = "image", chance: float | None = None, run_s: list[float] | None = None,
           dataset: str | None = None, metric: str = "top-1 %", header: bool = True, reused: int = 0) -> str:
    default_dataset, backbone, _ = TASKS[task]
    dataset = dataset or default_dataset
    flag = "" if task == "image" else f" --task {task}"
    title = {"video": "lora on pretrained vs random", "dense": "pretrained vs random (linear and lora)"}.get(
        task, "pretrained vs random, lora vs linear")
    lines = [f"# Embedded default: {title} {backbone}", ""] if header else []
    if task == "dense":
        lines += [f"## `{dataset}` ({metric})", ""]
    lines += [f"- dataset `{dataset}` ({data}), backbone `{backbone}`, "
             f"seeds {', '.join(map(str, seeds))}, default recipe" + (f", overrides `{' '.join(extra)}`" if extra else ""),
             f"- regenerate: `python -m tools.embedded_margins{flag}` ({seconds / 60:.1f} min on this machine"
             + (f"; {reused} of {len(seeds) * len(ARMS)} runs reused from existing records (skip_done), their "
                "wall times are the original runs'" if reused else "") + ")"]
    if run_s:
        lines.append(f"- wall time of one run of the default job (lora, pretrained): {min(run_s):.1f}-{max(run_s):.1f} s")
    lines += [""]
    lines += [
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for arm, _ in ARMS:
        m, s = mean_std(scores[arm])
        lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in scores[arm]) + f" | {m:.2f} ± {s:.2f} |")
    lines += ["", f"| claim | margin ({'pp' if task != 'dense' else metric + ' points'}) | larger std | holds |",
              "|---|---:|---:|---|"]
    for r in check(scores, chance):
        lines.append(f"| {r['better']} > {r['worse']} | {r['margin']:.2f} | {r['std']:.2f} | "
                     f"{'yes' if r['holds'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    import time

    from hydra import compose, initialize_config_dir

    from bench import CONF_DIR, ROOT
    from bench.imports import import_suite
    from bench.results import write_text_atomic
    from bench.run import run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for every run, e.g. train.epochs=2")
    p.add_argument("--records", default=None, help="results folder for the runs' records (default: temporary)")
    p.add_argument("--shared-records", default=None,
                   help="results folder for the pretrained arms (the leaderboard's configurations), with skip_done")
    p.add_argument("--task", choices=sorted(TASKS), default="image")
    p.add_argument("--out", default=None, help="default: results/embedded/margins.md (video: results/embedded_video/)")
    a = p.parse_args(argv)
    dataset, backbone, out = TASKS[a.task]
    a.out = a.out or str(ROOT / "results" / out)
    use_task(a.task)
    import_suite()
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.perf_counter()
    texts, holds = [], True
    dataset_list = DENSE_DATASETS if a.task == "dense" else (dataset,)
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        records = a.records or tmp
        for n, ds in enumerate(dataset_list):
            t1 = time.perf_counter()
            scores: dict[str, list[float]] = {arm: [] for arm, _ in ARMS}
            d = compose("config", overrides=[f"dataset={ds}", f"backbone={backbone}", *a.extra]).dataset
            data = f"{d.num_classes} classes, {d.sizes.train} train / {d.sizes.test:,} test"
            chance = 100.0 / int(d.num_classes) if a.task == "video" else None
            metric = {"detection": "box AP", "segmentation": "mIoU"}.get(str(d.get("kind")), "top-1 %")
            run_s, reused = [], 0
            for arm, over in ARMS:
                shared = a.shared_records and "backbone.checkpoint=null" not in over
                for seed in seeds:
                    overrides = [*over, f"dataset={ds}", f"backbone={backbone}", f"seed={seed}", "progress=false",
                                 f"results.dir={a.shared_records if shared else records}", *a.extra]
                    if shared:
                        overrides.append("skip_done=true")
                    rec = run(compose("config", overrides=overrides), overrides)
                    scores[arm].append(float(rec["score"]))
                    reused += bool(rec.get("skipped"))
                    if arm == ARMS[-1][0]:
                        run_s.append(float(rec["perf"]["wall_s"]))
            dense = a.task == "dense"
            texts.append(render(scores, seeds, a.extra, time.perf_counter() - (t1 if dense else t0), data, a.task,
                                chance, run_s if (chance or dense) else None, ds, metric, header=n == 0,
                                reused=reused))
            holds = holds and all(r["holds"] for r in check(scores, chance))
    text = "\n".join(texts)
    write_text_atomic(Path(a.out), text)
    print(text)
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
