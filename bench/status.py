"""What a sweep still lacks: ``python -m bench.status [--sweep DIR] [--missing | --command] [overrides...]``.

The overrides are the sweep's own (``results.dir=... method=lora,adapter 'dataset=glob(vtab/*)' seed=0,1,2``:
the same grammar as ``python -m bench -m``; ``hydra...`` overrides are kept only for ``--command``), or
``--sweep DIR`` reads them from a multirun folder's ``multirun.yaml`` (later overrides win). Every job is
composed exactly as the sweep composes it and its config hash (bench.state.config_hash) looked up among the
records under ``${results.dir}/runs``: ``done`` (a ``status: ok`` record), ``failed`` (only failed
records), ``missing`` (no record; ``started`` when its ``state/<hash>/last.pt`` exists: running, or
interrupted and resumable).

Prints a table and the counts; exit status 0 when every job is done, 1 otherwise, 2 on bad usage.
``--missing`` prints only the overrides of the jobs not done, one job a line; ``--command`` prints
``python -m bench -m ...`` commands that run exactly those jobs (one per group of jobs that differ in one
key; ``skip_done=true`` so a job finished meanwhile is not trained twice).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

RESULT_KEYS_IGNORED = ("results.dir",)


def _is_hydra(o: str) -> bool:
    return o.lstrip("+~").startswith(("hydra.", "hydra/"))


def sweep_overrides(sweep_dir: str | Path) -> tuple[list[str], list[str]]:
    """(task overrides, launcher overrides) of the multirun whose folder is ``sweep_dir``."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no multirun.yaml in {sweep_dir}: is it a sweep folder (hydra.sweep.dir)?")
    cfg = OmegaConf.load(path)
    task = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task") or []]
    hyd = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.hydra") or []
           if str(o).startswith(("hydra/launcher=", "hydra.launcher."))]
    return task, hyd


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """The job list of ``python -m bench -m <overrides>`` (Hydra's basic sweeper: the cartesian product)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, None)
    return [list(job) for job in batches[0]] if batches else [[]]


def job_hashes(jobs: list[list[str]]) -> list[str]:
    """Each job's config hash, composed as ``python -m bench`` composes it (bench.run.train_job)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bench import CONF_DIR
    from bench.state import config_hash

    out = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            cfg = compose(config_name="config", overrides=job)
            out.append(config_hash(OmegaConf.to_container(cfg, resolve=True)))
    return out


def _key(o: str) -> str:
    return o.partition("=")[0].lstrip("+~")


def _value(o: str) -> str:
    return o.partition("=")[2]


def job_table(jobs: list[list[str]], hashes: list[str], results_dir: str | Path) -> list[dict]:
    from bench.results import load_records

    ok: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    for r in load_records(results_dir):
        h = r.get("config_hash")
        if not h:
            continue
        newer = lambda a, b: b is None or (a.get("created", ""), a.get("run_id", "")) > (b.get("created", ""), b.get("run_id", ""))  # noqa: E731
        target = ok if r.get("status") == "ok" else failed
        if newer(r, target.get(h)):
            target[h] = r
    varying = varying_keys(jobs)
    rows = []
    for i, (job, h) in enumerate(zip(jobs, hashes)):
        label = " ".join(o for o in job if _key(o) in varying) or " ".join(
            o for o in job if _key(o) not in RESULT_KEYS_IGNORED) or "(defaults)"
        if h in ok:
            r = ok[h]
            score = r.get("score")
            rows.append({"job": i, "overrides": job, "label": label, "hash": h, "status": "done",
                         "result": f"{r.get('metric')} {score:.2f}" if isinstance(score, (int, float)) else "",
                         "record": r["_path"]})
        elif h in failed:
            f = failed[h].get("failure") or {}
            rows.append({"job": i, "overrides": job, "label": label, "hash": h, "status": "failed",
                         "result": f"{f.get('reason', 'failed')}: {' '.join(str(f.get('message', '')).split())[:80]}",
                         "record": failed[h]["_path"]})
        else:
            started = (Path(results_dir) / "state" / h / "last.pt").exists()
            rows.append({"job": i, "overrides": job, "label": label, "hash": h,
                         "status": "started" if started else "missing",
                         "result": "checkpoint: running or interrupted (resumes)" if started else "", "record": ""})
    return rows


def varying_keys(jobs: list[list[str]]) -> list[str]:
    """Keys whose value differs between jobs, in override order."""
    seen: dict[str, set] = {}
    for job in jobs:
        for o in job:
            seen.setdefault(_key(o), set()).add(_value(o))
    return [k for k, vals in seen.items() if len(vals) > 1]


def relaunch_commands(rows: list[dict], launcher: list[str]) -> list[str]:
    """``python -m bench -m`` commands covering exactly the jobs of ``rows``: jobs that agree on every key but
    the last varying one share a command (that key's values joined with commas)."""
    if not rows:
        return []
    jobs = [r["overrides"] for r in rows]
    varying = varying_keys(jobs)
    last = varying[-1] if varying else None
    groups: dict[tuple, list[str]] = {}
    for job in jobs:
        fixed = tuple(o for o in job if _key(o) != last)
        groups.setdefault(fixed, [])
        groups[fixed] += [_value(o) for o in job if _key(o) == last and _value(o) not in groups[fixed]]
    cmds = []
    for fixed, values in groups.items():
        args = list(launcher) + list(fixed) + ([f"{last}={','.join(values)}"] if last else []) + ["skip_done=true"]
        cmds.append("python -m bench -m " + " ".join(shlex.quote(a) for a in args))
    return cmds


def main(argv: list[str] | None = None) -> int:
    from bench.cli import check_group_overrides, expand_group_globs

    ap = argparse.ArgumentParser(prog="python -m bench.status", description=__doc__.splitlines()[0],
                                 epilog="exit status: 0 every job done, 1 some not done, 2 bad usage")
    ap.add_argument("overrides", nargs="*", help="the sweep's overrides (results.dir=DIR method=a,b seed=0,1 ...)")
    ap.add_argument("--sweep", metavar="DIR", help="read the overrides from DIR/multirun.yaml (a sweep folder)")
    show = ap.add_mutually_exclusive_group()
    show.add_argument("--missing", action="store_true", help="print the overrides of each job not done, one a line")
    show.add_argument("--command", action="store_true", help="print commands that run only the jobs not done")
    args = ap.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")])
    overrides, launcher = [], []
    try:
        if args.sweep:
            overrides, launcher = sweep_overrides(args.sweep)
        given = expand_group_globs(list(args.overrides))
    except (FileNotFoundError, SystemExit) as e:
        print(f"error: {e}" if not str(e).startswith("error:") else str(e), file=sys.stderr)
        return 2
    cli_launcher = [o for o in given if _is_hydra(o)]
    if any(_key(o) == "hydra/launcher" for o in cli_launcher):  # another launcher: the sweep's keys may not apply
        launcher = []
    launcher = [o for o in launcher if _key(o) not in {_key(c) for c in cli_launcher}] + cli_launcher
    given = [o for o in given if not _is_hydra(o)]
    overrides = [o for o in overrides if _key(o) not in {_key(g) for g in given}] + given
    problem = check_group_overrides(overrides)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    results_dir = next((_value(o) for o in reversed(overrides) if _key(o) == "results.dir"), "results")
    try:
        jobs = expand_jobs(overrides)
        hashes = job_hashes(jobs)
    except Exception as e:  # noqa: BLE001  (Hydra's override/compose errors: one line)
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    rows = job_table(jobs, hashes, results_dir)
    todo = [r for r in rows if r["status"] in ("missing", "failed")]
    if args.missing:
        for r in todo:
            print(" ".join(shlex.quote(o) for o in r["overrides"]))
    elif args.command:
        for c in relaunch_commands(todo, launcher):
            print(c)
    else:
        from tabulate import tabulate

        print(tabulate([[r["job"], r["label"], r["status"], r["result"], r["hash"]] for r in rows],
                       headers=["#", "job", "status", "result", "config hash"], tablefmt="github"))
        n = {s: sum(r["status"] == s for r in rows) for s in ("done", "failed", "started", "missing")}
        print(f"{len(rows)} jobs: {n['done']} done, {n['failed']} failed, {n['started']} started, "
              f"{n['missing']} missing (records in {Path(results_dir) / 'runs'})")
        if todo:
            print("run what is missing: python -m bench.status --command " +
                  " ".join(shlex.quote(a) for a in (["--sweep", args.sweep] if args.sweep else []) + list(args.overrides)))
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
