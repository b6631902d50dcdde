"""The bad-input table (README "When something goes wrong"): one case per row, each through the real CLI
(``python -m bench``), asserting the exit status and that stderr's last line names the key or file.

Exit statuses: 2 = bad input (nothing trained, no record), 3 = the run failed during training (a failed
record is written), 0 = fine. Every training run here is tiny (2-block ViT of width 32, 64 training images).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import ROOT
from bench.results import load_records

TINY_MODEL = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
              "train.epochs=2", "train.batch_size=32", "progress=false", "threads=1", "device=cpu"]
TINY = TINY_MODEL + ["dataset.sizes.train=64", "dataset.sizes.val=32", "dataset.sizes.test=64"]


def bench_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, **kw)


def last_line(out) -> str:
    lines = out.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def bad(out, *needles, code=2):
    line = last_line(out)
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, (n, line)
    return line


# ----------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,needle", [("method=lorra", "Did you mean 'lora'?"),
                                        ("dataset=synthetic/dsprites_lox", "Did you mean 'synthetic/dsprites_loc'?"),
                                        ("backbone=vit_mirco", "Did you mean 'vit_micro'?")])
def test_unknown_method_dataset_backbone(arg, needle):
    bad(bench_cli("mode=params", arg), needle)


@pytest.mark.parametrize("arg,key,near", [("train.lrr=0.1", "train.lrr", "train.lr"),
                                          ("method.rnk=4", "method.rnk", "method.rank"),
                                          ("+method.rnk=4", "method.rnk", "method.rank"),
                                          ("dataset.sizes.trian=8", "dataset.sizes.trian", "dataset.sizes.train"),
                                          ])
def test_unknown_key(arg, key, near):
    out = bench_cli("mode=params", arg)
    line = bad(out, f"'{key}'", f"Did you mean '{near}'?")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_unknown_key_checked_against_the_selected_method():
    bad(bench_cli("mode=params", "method=bitfit", "method.rank=4"), "'method.rank'", "conf/method/bitfit.yaml")


@pytest.mark.parametrize("arg,key", [("train.lr=0", "train.lr"),
                                     ("train.epochs=0", "train.epochs"), ("train.batch_size=0", "train.batch_size"),
                                     ("method.rank=0", "method.rank"),
                                     ("method=snell", "method.sparsity")])
def test_out_of_range_value(tmp_path, arg, key):
    extra = ["method.sparsity=1.0"] if arg == "method=snell" else []
    out = bench_cli(*TINY, arg, *extra, f"results.dir={tmp_path}", "dataset.root=/nonexistent/never/read")
    bad(out, key)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.json"))


@pytest.mark.parametrize("budget,needle", [("10M", "is impossible"), ("0", "method.budget")])
def test_impossible_spt_budget(tmp_path, budget, needle):
    out = bench_cli(*TINY, "method=spt_lora", f"method.budget={budget}", f"results.dir={tmp_path}")
    bad(out, "method.budget", needle)
    assert "decoding" not in out.stderr and "generating" not in out.stderr.lower()


def test_unsupported_method_backbone():
    bad(bench_cli("mode=params", "method=vpt_shallow", "backbone=convnext_micro"), "vpt_shallow", "convnext")


# ----------------------------------------------------------------------------------------------
# files and folders (pre-flight)
# ----------------------------------------------------------------------------------------------
def test_missing_data_root(tmp_path):
    bad(bench_cli(*TINY_MODEL, "dataset=vtab/dtd", f"dataset.root={tmp_path}/nope", f"results.dir={tmp_path}"),
        f"{tmp_path}/nope")


def test_missing_checkpoint_file(tmp_path):
    tiny = [o for o in TINY if not o.startswith("backbone.checkpoint=")]
    missing = tmp_path / "ViT-B_16.npz"
    line = bad(bench_cli(*tiny, f"backbone.checkpoint={missing}", f"results.dir={tmp_path}"), str(missing))
    assert "backbone.checkpoint" in line


def test_non_checkpoint_file(tmp_path):
    junk = tmp_path / "notes.pth"
    junk.write_text("hello")
    tiny = [o for o in TINY if not o.startswith("backbone.checkpoint=")]
    bad(bench_cli(*tiny, f"backbone.checkpoint={junk}", f"results.dir={tmp_path}"), str(junk))


def test_checkpoint_that_does_not_fit(tmp_path):
    """vit_micro's shipped weights into a 2-block width-32 ViT: missing/unexpected keys, shapes."""
    tiny = [o for o in TINY if not o.startswith("backbone.checkpoint=")]
    out = bench_cli(*tiny, f"results.dir={tmp_path}")
    line = bad(out, "vit_micro_fractal.safetensors")
    assert "unexpected" in line or "missing" in line or "shape" in line


def test_read_only_results_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        target = ro / "results"
        if os.access(ro, os.W_OK):  # root ignores permission bits: a path below a regular file cannot be created
            (tmp_path / "file").write_text("")
            target = tmp_path / "file" / "results"
        bad(bench_cli(*TINY, f"results.dir={target}"), f"results.dir={target}", "not writable")
    finally:
        os.chmod(ro, 0o755)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def _vtab_task(root: Path, lines: list[str], n_images: int = 4, corrupt: bool = False) -> Path:
    from PIL import Image

    task = root / "dtd"
    (task / "images").mkdir(parents=True)
    for i in range(n_images):
        p = task / "images" / f"{i}.jpg"
        if corrupt and i == 1:
            p.write_bytes(b"not a jpeg")
        else:
            Image.new("RGB", (40, 40), (i * 40, 20, 200)).save(p)
    for name in ("train800", "val200", "train800val200", "test"):
        (task / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return task


VTAB = ["dataset=vtab/dtd", "train.epochs=1"]


def test_malformed_list_line(tmp_path):
    task = _vtab_task(tmp_path / "vtab", ["images/0.jpg 0", "images/1.jpg", "images/2.jpg 2"])
    out = bench_cli(*TINY_MODEL, *VTAB, f"dataset.root={tmp_path / 'vtab'}", f"results.dir={tmp_path}")
    bad(out, f"{task / 'train800val200.txt'} line 2")


def test_label_out_of_range(tmp_path):
    task = _vtab_task(tmp_path / "vtab", ["images/0.jpg 0", "images/1.jpg 47", "images/2.jpg 2"])
    out = bench_cli(*TINY_MODEL, *VTAB, f"dataset.root={tmp_path / 'vtab'}", f"results.dir={tmp_path}")
    line = bad(out, "47")
    assert str(task) in line


def test_corrupt_image(tmp_path):
    _vtab_task(tmp_path / "vtab", ["images/0.jpg 0", "images/1.jpg 1", "images/2.jpg 2"], corrupt=True)
    out = bench_cli(*TINY_MODEL, *VTAB, f"dataset.root={tmp_path / 'vtab'}", f"results.dir={tmp_path}")
    bad(out, "1.jpg")


# ----------------------------------------------------------------------------------------------
# training failures are records
# ----------------------------------------------------------------------------------------------
def test_nan_loss_is_a_failed_record(tmp_path):
    out = bench_cli(*TINY, "train.lr=1e30", "train.warmup_epochs=0", f"results.dir={tmp_path}")
    line = bad(out, "loss is", "step", code=3)
    [rec] = load_records(tmp_path)
    assert rec["status"] == "failed" and rec["failure"]["reason"] == "non_finite_loss"
    assert rec["failure"]["step"] >= 1 and rec["score"] is None and rec["config_hash"]
    assert rec["_path"].split("/")[-1] in line
    # the leaderboard leaves it out of the means and lists it under the table
    from bench.leaderboard import main as leaderboard_main

    from bench.results import write_record

    ok = {k: v for k, v in rec.items() if k not in ("_path", "failure")}
    ok.update(status="ok", method="linear", run_id="x-ok", config_hash="1" * 16, metric="top1", score=12.5,
              top1=12.5, metrics={"top1": 12.5}, protocol={**rec["protocol"], "train_split": "a", "eval_split": "b"})
    write_record(tmp_path, ok)
    assert leaderboard_main([f"results.dir={tmp_path}"]) == 0
    md = (tmp_path / "embedded" / "leaderboard.md").read_text()
    assert "Failed runs" in md and "non_finite_loss" in md and "| linear" in md
    table = md.split("Failed runs")[0]
    assert "| lora" not in table


def test_failed_job_does_not_stop_the_sweep(tmp_path):
    out = bench_cli("-m", "train.lr=1e30,5e-3", "train.warmup_epochs=0", *TINY, "train.epochs=1",
                    f"results.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode != 0
    assert sorted(r["status"] for r in load_records(tmp_path)) == ["failed", "ok"]


# ----------------------------------------------------------------------------------------------
# interrupted run: kill -9 mid-run, rerun the same command, same final metric
# ----------------------------------------------------------------------------------------------
RESUME = [o for o in TINY if not o.startswith(("train.epochs", "dataset.sizes.train"))] + [
    "train.epochs=3", "dataset.sizes.train=128", "train.batch_size=16", "method.dropout=0.1"]


def _final(tmp: Path) -> dict:
    [rec] = [r for r in load_records(tmp) if r["status"] == "ok"]
    return rec


def test_interrupted_run_resumes_to_the_same_metric(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = bench_cli(*RESUME, f"results.dir={ref_dir}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = [sys.executable, "-m", "bench", *RESUME, f"results.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not list((run_dir / "state").glob("*/last.pt")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list((run_dir / "runs").rglob("*.json")) if (run_dir / "runs").exists() else True
    again = bench_cli(*RESUME, f"results.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = _final(ref_dir), _final(run_dir)
    assert b["resumed"] and b["resumed"]["from_epoch"] >= 1
    assert b["config_hash"] == a["config_hash"]
    assert b["score"] == a["score"] and b["metrics"] == a["metrics"]
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    assert not (run_dir / "state").exists()  # cleaned after the record


def test_sigterm_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    """Pre-emption (SIGTERM): exit 130, no record, last.pt kept, the last stderr line names it."""
    args = [sys.executable, "-m", "bench", *RESUME, f"results.dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((tmp_path / "state").glob("*/last.pt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    [ck] = list((tmp_path / "state").glob("*/last.pt"))
    assert proc.returncode == 130, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: interrupted") and str(ck) in line and "resume" in line
    assert not list((tmp_path / "runs").rglob("*.json"))


# ----------------------------------------------------------------------------------------------
# sweeps: skip finished work; parallel writers
# ----------------------------------------------------------------------------------------------
def test_skip_done(tmp_path):
    first = bench_cli(*TINY, "method=linear", "train.epochs=1", f"results.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    again = bench_cli(*TINY, "method=linear", "train.epochs=1", "skip_done=true", f"results.dir={tmp_path}")
    assert again.returncode == 0 and "[skip]" in again.stdout
    assert len(load_records(tmp_path)) == 1
    from bench.run import find_done

    [rec] = load_records(tmp_path)
    assert find_done(tmp_path, rec["config_hash"])["run_id"] == rec["run_id"]
    assert find_done(tmp_path, "0" * 16) is None  # another config (e.g. seed=1) is not done


def test_identical_commands_at_once_leave_two_records(tmp_path):
    args = [sys.executable, "-m", "bench", *TINY, "method=linear", f"results.dir={tmp_path}"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    recs = load_records(tmp_path)
    assert len(recs) == 2 and len({r["run_id"] for r in recs}) == 2
    assert len({r["config_hash"] for r in recs}) == 1
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


def test_parallel_sweep_with_joblib(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = bench_cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=linear,bitfit", *TINY,
                    "train.epochs=1", f"results.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr[-3000:]
    recs = load_records(tmp_path)
    assert sorted(r["method"] for r in recs) == ["bitfit", "linear"]
    assert all(json.loads(Path(r["_path"]).read_text())["status"] == "ok" for r in recs)


def test_image_cache_parallel_writers(tmp_path):
    """Two writers decode the same split into the shared image cache at once: one complete cache remains
    (write to a temp folder, then rename; the loser keeps the winner's), both read identical pixels."""
    import threading

    import numpy as np
    from PIL import Image

    from datasets.images import Item, cached_fixed

    items = []
    for i in range(6):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(p)
        items.append(Item(path=p, label=i, source=f"list line {i + 1}"))
    barrier = threading.Barrier(2)

    def decode(it):
        time.sleep(0.01)  # both writers are inside the decode loop at the same time
        return np.asarray(Image.open(it.path).convert("RGB")).transpose(2, 0, 1).copy()

    out, errors = [None, None], []

    def writer(k):
        try:
            barrier.wait()
            out[k] = cached_fixed(items, {"t": "test"}, decode, (3, 8, 8), tmp_path / "cache", workers=1)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    (a, ia), (b, ib) = out
    assert ia["key"] == ib["key"] and bool((a == b).all()) and int(a[3, 0, 0, 0]) == 90
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ia["key"]]  # no temp folder left


def test_shipped_recipes_set_only_known_keys():
    """Recipes are checked like the command line: every key a recipe sets must exist in its yaml."""
    from omegaconf import OmegaConf

    from bench import CONF_DIR
    from bench.checks import find_unknown, group_tree, top_tree

    root = Path(CONF_DIR) / "recipe"
    problems = []
    for f in sorted(root.rglob("*.yaml")):
        method, dataset = f.relative_to(root).parts[0], f.relative_to(root).with_suffix("").as_posix().split("/", 1)[1]
        rec = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        trees = {**top_tree(), "method": group_tree("method", method), "dataset": group_tree("dataset", dataset)}
        for k, v in rec.items():
            if k == "recipe":
                continue
            msg = (f"unknown top-level key {k}" if k not in trees else find_unknown(v, trees[k], [k], str(f)))
            if msg:
                problems.append(f"{f}: {msg}")
    assert not problems, problems[:5]
