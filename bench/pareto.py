"""Pareto plot of a leaderboard table: mean score (top-1, or the kind's metric) against trainable parameters (log x), with matplotlib.

Each point is one method row (mean over its datasets, seeds averaged first); the points no other point
beats on both axes (at most as many parameters and at least the top-1) are joined as the Pareto front
and labelled in bold. A method with 0 trainable parameters outside the head (``linear``) is drawn at
x = 1 and its label says so. Written atomically (temp file, rename) and byte-stable: no timestamp or
version in the PNG metadata.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

FLOOR = 1.0  # where 0 trainable parameters sit on the log axis


def pareto_front(points: pd.DataFrame) -> pd.DataFrame:
    """Rows of ``points`` (columns params, score) that no other row dominates, sorted by params."""
    pts = points.sort_values(["params", "score"], ascending=[True, False])
    front, best = [], float("-inf")
    for idx, row in pts.iterrows():
        if row["score"] > best:
            front.append(idx)
            best = row["score"]
    return points.loc[front].sort_values("params")


def plot(points: pd.DataFrame, title: str, path: str | Path, metric: str = "top1") -> bool:
    """Write the plot; False (nothing written) when there are no points."""
    if points.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = points.copy()
    pts["x"] = pts["params"].clip(lower=FLOOR)
    front = pareto_front(pts)
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    ax.scatter(pts["x"], pts["score"], s=22, color="tab:blue", zorder=3)
    ax.plot(front["x"], front["score"], drawstyle="steps-post", color="tab:red", lw=1.2, zorder=2,
            label="Pareto front")
    for _, r in pts.sort_values("label").iterrows():
        on_front = r.name in front.index
        text = r["label"] + (" (0 params)" if r["params"] < FLOOR else "")
        ax.annotate(text, (r["x"], r["score"]), xytext=(3, 3), textcoords="offset points", fontsize=6.5,
                    fontweight="bold" if on_front else "normal", color="black" if on_front else "0.35")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (excluding the head), log scale")
    names = {"top1": "top-1 (%)", "miou": "mIoU (%)", "box_ap": "box AP", "mask_ap": "mask AP"}
    ax.set_ylabel(f"mean {names.get(metric, metric)} over datasets and seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
