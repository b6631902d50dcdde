"""Sweeps at cluster scale: the submitit launcher for real (``hydra/launcher=local``, the same code path as the
Slurm preset), the per-job status lines and summary (bench/sweep_status.py), ``python -m bench.status``
(what a sweep lacks), and the leaderboard's de-duplication of records by config hash. Every training run is
tiny (2-block ViT of width 32, 64 training images, 1 epoch)."""
from __future__ import annotations

import pickle
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from bench import ROOT
from bench.cli import BadInput, RunFailed
from bench.results import load_records, write_record

TINY = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "train.epochs=1", "train.batch_size=32", "progress=false", "threads=1", "device=cpu",
        "dataset.sizes.train=64", "dataset.sizes.val=32", "dataset.sizes.test=64"]


def run_py(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def bench_cli(*args, **kw):
    return run_py("-m", "bench", *args, **kw)


class StatusOut:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def status_cli(*args):
    """``python -m bench.status ARGS``, in this process (composing is the slow part, not the import)."""
    import contextlib
    import io

    from bench.status import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return StatusOut(rc, out.getvalue(), err.getvalue())


def job_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("[job ")]


# ----------------------------------------------------------------------------------------------
# submitit (local executor): 2 jobs in their own processes
# ----------------------------------------------------------------------------------------------
def test_submitit_local_sweep_writes_records_and_reports(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    out = bench_cli("-m", "hydra/launcher=local", "method=linear,bitfit", *TINY, f"results.dir={tmp_path}",
                    f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-3000:]
    recs = load_records(tmp_path)
    assert sorted(r["method"] for r in recs) == ["bitfit", "linear"] and {r["status"] for r in recs} == {"ok"}
    assert list((sweep / ".submitit").glob("*/*_result.pkl")), "jobs ran through submitit"
    lines = job_lines(out.stdout)
    assert sorted(l.split()[:3] for l in lines) == [["[job", "1/2]", "done"], ["[job", "2/2]", "done"]]
    for r in recs:
        assert any(f"done {r['method']}/synthetic/dsprites_loc/vit_micro/seed0 top1 {r['score']:.2f} (" in l
                   for l in lines), lines
    summary = [l for l in out.stdout.splitlines() if l.startswith("[sweep]")]
    assert summary[0].startswith("[sweep] 2 jobs: 2 done, 0 failed, 0 skipped in ")
    assert f"records in {tmp_path}/runs" in summary[0]
    st = status_cli("--sweep", str(sweep))
    assert st.returncode == 0, st.stdout + st.stderr
    assert "2 jobs: 2 done, 0 failed, 0 started, 0 missing" in st.stdout


def test_submitit_local_failed_job_fails_the_sweep_not_the_others(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = bench_cli("-m", "hydra/launcher=local", "train.lr=1e30,5e-3", "train.warmup_epochs=0", "method=linear",
                    *TINY, f"results.dir={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode != 0
    recs = load_records(tmp_path)
    assert sorted(r["status"] for r in recs) == ["failed", "ok"]
    [failed] = [r for r in recs if r["status"] == "failed"]
    lines = job_lines(out.stdout)
    assert any(" done linear/synthetic/dsprites_loc/vit_micro/seed0 train.lr=0.005 top1 " in l for l in lines), lines
    assert any(" failed linear/synthetic/dsprites_loc/vit_micro/seed0 train.lr=1e+30 (non_finite_loss: " in l
               for l in lines), lines
    assert "[sweep] 2 jobs: 1 done, 1 failed, 0 skipped" in out.stdout  # printed although Hydra raised
    assert f"record {failed['_path']}" in out.stdout and "python -m bench.status --sweep" in out.stdout
    assert "RunFailed" in out.stderr  # Hydra's own report of the failed job


# ----------------------------------------------------------------------------------------------
# python -m bench.status: one of two jobs done, the other missing; its --command runs only that one
# ----------------------------------------------------------------------------------------------
def test_status_lists_missing_jobs_and_the_command_runs_them(tmp_path):
    sweep = ["method=linear,bitfit", *TINY, f"results.dir={tmp_path}"]
    first = bench_cli("method=linear", *TINY, f"results.dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    st = status_cli(*sweep)
    assert st.returncode == 1, st.stdout + st.stderr
    rows = {l.split("|")[2].strip(): l.split("|")[3].strip() for l in st.stdout.splitlines() if re.match(r"\|\s+\d", l)}
    assert rows == {"method=linear": "done", "method=bitfit": "missing"}
    assert "2 jobs: 1 done, 0 failed, 0 started, 1 missing" in st.stdout
    [missing] = status_cli(*sweep, "--missing").stdout.strip().splitlines()
    assert "method=bitfit" in missing and "method=linear" not in missing
    [cmd] = status_cli(*sweep, "--command").stdout.strip().splitlines()
    assert cmd.startswith("python -m bench -m ") and cmd.endswith("skip_done=true") and "method=bitfit" in cmd
    args = shlex.split(cmd)[3:] + [f"hydra.sweep.dir={tmp_path}/sweep"]
    again = bench_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(r["method"] for r in load_records(tmp_path)) == ["bitfit", "linear"]
    assert [l.split()[2:4] for l in job_lines(again.stdout)] == [["done", "bitfit/synthetic/dsprites_loc/vit_micro/seed0"]]
    st = status_cli(*sweep)
    assert st.returncode == 0 and "2 jobs: 2 done" in st.stdout, st.stdout + st.stderr


def test_status_bad_usage_is_exit_2(tmp_path):
    out = status_cli(f"results.dir={tmp_path}", "method=linear,lorra")
    assert out.returncode == 2 and out.stderr.startswith("error: unknown method 'lorra'")
    out = status_cli("--sweep", str(tmp_path))
    assert out.returncode == 2 and "multirun.yaml" in out.stderr


def test_relaunch_commands_cover_exactly_the_missing_jobs():
    from bench.status import expand_jobs, relaunch_commands

    jobs = expand_jobs(["method=lora,adapter", "dataset=vtab/dtd,vtab/svhn", "seed=0,1", "results.dir=r"])
    assert len(jobs) == 8
    todo = [j for j in jobs if not ("method=lora" in j and "seed=0" in j)]
    cmds = relaunch_commands([{"overrides": j} for j in todo], ["hydra/launcher=slurm"])
    covered = sorted(tuple(sorted(j)) for c in cmds for j in expand_jobs(shlex.split(c)[5:-1]))
    assert covered == sorted(tuple(sorted(j)) for j in todo)
    assert all(c.startswith("python -m bench -m hydra/launcher=slurm ") for c in cmds)


# ----------------------------------------------------------------------------------------------
# the callback on fake JobReturns (what the basic, joblib and submitit launchers hand it)
# ----------------------------------------------------------------------------------------------
def job_config(tmp_path, num: int, overrides: list[str]):
    return OmegaConf.create({
        "method": {"name": "lora"}, "dataset": {"name": "vtab/cifar100"}, "backbone": {"name": "vit_b16"},
        "seed": 0, "results": {"dir": str(tmp_path / "results")},
        "hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(tmp_path / "sweep")}, "job": {"num": num},
                  "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
                  "overrides": {"task": overrides}},
    })


def job_return(status, value, overrides):
    ret = JobReturn(overrides=overrides, status=status)
    ret.return_value = value
    return ret


def record(**kw):
    return {"status": "ok", "method": "lora", "variant": "", "dataset": "vtab/cifar100", "backbone": "vit_b16",
            "seed": 0, "metric": "top1", "score": 71.234, "config_hash": "ab" * 8, "_path": "/r/x.json",
            "perf": {"wall_s": 312.0}, **kw}


def test_callback_lines_and_summary_from_fake_job_returns(tmp_path, capsys):
    from bench.sweep_status import SweepStatus

    sweep_over = ["dataset=vtab/cifar100,vtab/dtd", "train.lr=1e-3,1e-2"]
    cb = SweepStatus(poll_s=60)
    cb.on_multirun_start(config=job_config(tmp_path, 0, sweep_over))
    failed = RunFailed("run failed: loss is nan", record(status="failed", score=None, metric=None,
                                                           failure={"reason": "non_finite_loss", "message": "loss is nan"}))
    cases = [
        (JobStatus.COMPLETED, record(), ["dataset=vtab/cifar100", "train.lr=1e-3"]),
        (JobStatus.FAILED, failed, ["dataset=vtab/cifar100", "train.lr=1e-2"]),
        (JobStatus.COMPLETED, record(skipped=True), ["dataset=vtab/dtd", "train.lr=1e-3"]),
        (JobStatus.FAILED, BadInput("train.lr must be a number"), ["dataset=vtab/dtd", "train.lr=1e-2"]),
    ]
    for num, (status, value, over) in enumerate(cases):
        cfg = job_config(tmp_path, num, over)
        cb.on_job_start(config=cfg)
        cb.on_job_end(config=cfg, job_return=job_return(status, value, over))
    assert len(list((tmp_path / "sweep" / ".bench_status").glob("*.json"))) == 4
    cb.on_multirun_end(config=job_config(tmp_path, 0, sweep_over))
    out = capsys.readouterr().out.splitlines()
    name = "lora/vtab/cifar100/vit_b16/seed0"
    assert re.fullmatch(rf"\[job 1/4\] done {name} train.lr=1e-3 top1 71.23 \(\d+\.\d s\)", out[0]), out[0]
    assert out[1].startswith(f"[job 2/4] failed {name} train.lr=1e-2 (non_finite_loss: loss is nan) (")
    assert out[2] == f"[job 3/4] skipped {name} train.lr=1e-3 (already done)"
    assert out[3].startswith(f"[job 4/4] failed {name} train.lr=1e-2 (bad input: train.lr must be a number)")
    assert out[4].startswith("[sweep] 4 jobs: 1 done, 2 failed, 1 skipped in ")
    assert f"records in {tmp_path / 'results'}/runs" in out[4]
    assert out[5].startswith("[sweep] failed #1: ") and "record /r/x.json" in out[5]
    assert "python -m bench.status --sweep" in out[-1]
    cb._finish()  # atexit after on_multirun_end: nothing printed twice
    assert capsys.readouterr().out == ""


def test_callback_is_quiet_in_a_single_run_and_survives_pickling(tmp_path, capsys):
    from bench.sweep_status import SweepStatus

    cb = SweepStatus()
    cfg = job_config(tmp_path, 0, [])
    cfg.hydra.mode = "RUN"
    cb.on_job_end(config=cfg, job_return=job_return(JobStatus.COMPLETED, record(), []))
    assert capsys.readouterr().out == "" and not (tmp_path / "sweep").exists()
    cb.on_multirun_start(config=job_config(tmp_path, 0, ["seed=0,1"]))
    clone = pickle.loads(pickle.dumps(cb))  # what joblib/submitit ship to the workers (a thread cannot go)
    clone._pid = -1  # as seen from another process: writes its entry, prints nothing
    clone.on_job_end(config=job_config(tmp_path, 1, ["seed=1"]), job_return=job_return(JobStatus.COMPLETED, record(seed=1), ["seed=1"]))
    assert capsys.readouterr().out == ""
    cb.on_multirun_end(config=job_config(tmp_path, 0, ["seed=0,1"]))
    out = capsys.readouterr().out
    assert "[job 1/2] done lora/vtab/cifar100/vit_b16/seed1 top1 71.23" in out
    assert "[sweep] 2 jobs: 1 done, 0 failed, 0 skipped, 1 not reported" in out


def test_run_failed_pickles_with_its_record():
    e = pickle.loads(pickle.dumps(RunFailed("run failed: x", {"status": "failed", "_path": "/p"})))
    assert isinstance(e, RunFailed) and str(e) == "run failed: x" and e.record["_path"] == "/p"


# ----------------------------------------------------------------------------------------------
# records from many nodes: one file per run, the leaderboard keeps one row per config hash
# ----------------------------------------------------------------------------------------------
def test_leaderboard_deduplicates_by_config_hash(tmp_path):
    from bench.leaderboard import records_frame
    from test_results import fake_record

    a = {**fake_record("lora", top1=60.0), "config_hash": "c" * 16, "env": {"device": "node-a"}}
    b = {**fake_record("lora", top1=61.0, created="2026-01-02T00:00:00"), "config_hash": "c" * 16,
         "env": {"device": "node-b"}}
    other_seed = {**fake_record("lora", seed=1, top1=50.0), "config_hash": "d" * 16}
    for r in (a, b, other_seed):
        write_record(tmp_path, r)
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 3  # no file clashes
    df = records_frame(tmp_path)
    assert sorted(df["config_hash"]) == ["c" * 16, "d" * 16]
    assert float(df[df["config_hash"] == "c" * 16]["score"].iloc[0]) == 61.0  # the newer record


def test_slurm_preset_composes_on_the_submitit_plugin():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from bench import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        slurm = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
        plain = compose("config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True).hydra.launcher
        local = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and plain._target_ == slurm._target_
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node, slurm.array_parallelism) == ("gpu", 1, 1, 64)
    assert slurm.timeout_min > 0 and slurm.cpus_per_task and slurm.mem_gb and slurm.setup == []
    assert local._target_.endswith("LocalLauncher")
    assert Path(CONF_DIR / "hydra" / "launcher" / "slurm.yaml").read_text().count("#") > 10  # documented


def test_two_sweeps_started_in_one_second_get_their_own_folders():
    """hydra.sweep.dir resolves to microseconds: two multiruns launched together (e.g. one per dataset on one
    machine) must not share job folders or ``.bench_status`` (they did with Hydra's %H-%M-%S)."""
    import time

    from hydra.core.utils import setup_globals

    from bench import CONF_DIR

    setup_globals()  # Hydra's ${now:} resolver
    pattern = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml").hydra.sweep)["dir"]  # unresolved
    dirs = set()
    for _ in range(3):
        dirs.add(str(OmegaConf.create({"d": pattern}).d))
        time.sleep(0.002)
    assert len(dirs) == 3 and all(re.fullmatch(r"multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d-\d{6}", d) for d in dirs)
