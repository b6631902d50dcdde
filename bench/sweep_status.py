"""Sweep progress: one status line per finished job of a multirun, and a summary when the sweep ends.

Registered in ``conf/config.yaml`` (``hydra.callbacks.sweep_status``); it does nothing in a single run.

Where each hook runs depends on the launcher: with the basic (sequential) launcher every job runs inside the
launcher process; with joblib in worker processes; with submitit in separate processes, on other nodes for
Slurm. ``on_job_end`` therefore never prints in the launcher's terminal itself: it writes one small JSON
entry per job to ``${hydra.sweep.dir}/.bench_status/<job num>.json`` (the sweep folder is on a shared file
system, as submitit needs anyway), and the launcher process, which started a watcher thread in
``on_multirun_start``, prints a line for each entry as it appears::

    [job 3/40] done lora/vtab/cifar100/vit_b16/seed0 top1 71.23 (312 s)
    [job 4/40] failed lora/vtab/dtd/vit_b16/seed0 (non_finite_loss: loss is nan at step 12) (40 s)
    [job 5/40] skipped lora/vtab/eurosat/vit_b16/seed0 (already done)

The summary is printed by ``on_multirun_end`` from those entries. Hydra skips ``on_multirun_end`` when a job
failed (its sweeper re-raises the first failed job's exception), so the summary is also registered with
``atexit`` and printed once, after Hydra's error message, whichever way the sweep ends.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

STATUS_DIR = ".bench_status"


def fmt_seconds(s: Optional[float]) -> str:
    if s is None:
        return "? s"
    s = float(s)
    if s < 100:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def _is_multirun(config: DictConfig) -> bool:
    from hydra.types import RunMode

    mode = OmegaConf.select(config, "hydra.mode")
    return mode == RunMode.MULTIRUN or str(mode) in ("MULTIRUN", "RunMode.MULTIRUN")


def run_label(config: DictConfig, record: Optional[dict], overrides: list[str]) -> str:
    """``method[variant]/dataset/backbone/seed<seed>``, the name train_job prints (from the record if any)."""
    from bench.run import method_variant

    r = record or {}
    method = r.get("method") or OmegaConf.select(config, "method.name") or "?"
    variant = r["variant"] if "variant" in r else method_variant(list(overrides))
    dataset = r.get("dataset") or OmegaConf.select(config, "dataset.name") or "?"
    backbone = r.get("backbone") or OmegaConf.select(config, "backbone.name") or "?"
    seed = r.get("seed", OmegaConf.select(config, "seed"))
    return f"{method}{'[' + variant + ']' if variant else ''}/{dataset}/{backbone}/seed{seed}"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def job_entry(config: DictConfig, job_return: JobReturn, wall_s: Optional[float] = None) -> dict:
    """What one finished job reports: status (done | failed | skipped), its name, metric, time, record."""
    from bench.cli import BadInput, RunFailed

    overrides = list(job_return.overrides or [])
    value = job_return._return_value  # .return_value re-raises a failed job's exception
    entry: dict[str, Any] = {"num": OmegaConf.select(config, "hydra.job.num"), "overrides": overrides,
                             "wall_s": wall_s, "metric": None, "score": None, "reason": None, "record": None,
                             "config_hash": None}
    record = None
    if job_return.status == JobStatus.COMPLETED:
        record = value if isinstance(value, dict) else None
        if record is not None and record.get("skipped"):
            entry.update(status="skipped", reason="already done")
        elif record is not None and record.get("status") == "failed":  # not raised (not from the CLI)
            entry.update(status="failed", reason=(record.get("failure") or {}).get("reason", "failed"))
        else:
            entry["status"] = "done"
        if record is not None:
            entry.update(metric=record.get("metric"), score=record.get("score"))
            if entry["metric"] is None and "trainable_params" in record:  # mode=params
                entry.update(metric="params", score=record["trainable_params"])
    else:
        entry["status"] = "failed"
        if isinstance(value, RunFailed):
            record = value.record
            info = record.get("failure") or {}
            entry["reason"] = _one_line(f"{info.get('reason', 'failed')}: {info.get('message', value)}")
        elif isinstance(value, BadInput):
            entry["reason"] = _one_line(f"bad input: {value}")
        else:
            entry["reason"] = _one_line(f"{type(value).__name__}: {value}") if value is not None else "failed"
    if record is not None:
        entry["record"] = record.get("_path")
        entry["config_hash"] = record.get("config_hash")
        if entry["wall_s"] is None:  # the job's own clock when the callback saw no start
            entry["wall_s"] = (record.get("perf") or {}).get("wall_s")
    entry["name"] = run_label(config, record, overrides)
    return entry


def shown_name(entry: dict, show: frozenset = frozenset()) -> str:
    extra = [o for o in entry.get("overrides") or [] if o.partition("=")[0].lstrip("+~") in show]
    return " ".join([entry["name"], *extra])


def status_line(entry: dict, k: int, total: Optional[int], show: frozenset = frozenset()) -> str:
    """``show``: swept keys the name does not tell apart (e.g. ``train.lr``), appended as ``key=value``."""
    head = f"[job {k}/{total}]" if total else f"[job {k}]"
    entry = {**entry, "name": shown_name(entry, show)}
    t = fmt_seconds(entry.get("wall_s"))
    if entry["status"] == "done":
        score = entry.get("score")
        if entry.get("metric") == "params":
            what = f" params {int(score):,}"
        elif score is not None:
            what = f" {entry.get('metric') or 'score'} {float(score):.2f}"
        else:
            what = ""
        return f"{head} done {entry['name']}{what} ({t})"
    if entry["status"] == "skipped":
        return f"{head} skipped {entry['name']} (already done)"
    return f"{head} failed {entry['name']} ({entry.get('reason') or 'failed'}) ({t})"


NAMED_KEYS = ("method", "dataset", "backbone", "seed")  # in every job's name already (method.* as [variant])


def sweep_shape(config: DictConfig) -> tuple[Optional[int], frozenset]:
    """(number of jobs, swept keys that the job name does not show) of a basic-sweeper multirun; the number
    is None for other sweepers."""
    try:
        target = str(OmegaConf.select(config, "hydra.sweeper._target_") or "")
        if not target.endswith("BasicSweeper"):
            return None, frozenset()
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = OmegaConf.select(config, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
        by_key = {}
        for o in OverridesParser.create().parse_overrides(args):
            by_key[o.key_or_group] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
        n = 1
        for v in by_key.values():
            n *= v
        show = frozenset(k for k, v in by_key.items() if v > 1 and k not in NAMED_KEYS and not k.startswith("method."))
        return n, show
    except Exception:  # noqa: BLE001  (a progress counter never breaks a sweep)
        return None, frozenset()


class SweepStatus(Callback):
    """Hydra callback: per-job status lines and a sweep summary (see the module docstring)."""

    def __init__(self, poll_s: float = 2.0, enabled: bool = True) -> None:
        self.poll_s = float(poll_s)
        self.enabled = bool(enabled)
        self._pid: Optional[int] = None   # the launcher process (set in on_multirun_start)
        self._dir: Optional[Path] = None
        self._results: Optional[str] = None
        self._total: Optional[int] = None
        self._show: frozenset = frozenset()
        self._t0 = 0.0
        self._job_t0: dict[Any, float] = {}
        self._seen: set[str] = set()
        self._entries: list[dict] = []
        self._finished = False
        self._lock: Optional[threading.Lock] = None
        self._stop: Optional[threading.Event] = None
        self._thread: Optional[threading.Thread] = None

    # the launcher pickles the callbacks into joblib workers / submitit jobs: no thread, lock or event there
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_lock=None, _stop=None, _thread=None, _entries=[], _seen=set())
        return state

    # ------------------------------------------------------------------ launcher process
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.enabled:
            return
        self._pid = os.getpid()
        self._t0 = time.time()
        self._dir = Path(str(config.hydra.sweep.dir)).resolve() / STATUS_DIR
        self._results = str(Path(str(OmegaConf.select(config, "results.dir") or "results")).resolve())
        self._total, self._show = sweep_shape(config)
        if self._dir.exists():  # entries of an earlier multirun into the same sweep folder
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sweep-status", daemon=True)
        self._thread.start()
        atexit.register(self._finish)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._finish()

    def _watch(self) -> None:
        assert self._stop is not None
        while not self._stop.wait(self.poll_s):
            self._drain()

    def _drain(self) -> None:
        if self._lock is None or self._dir is None:
            return
        with self._lock:
            try:
                paths = sorted(self._dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))
            except OSError:
                return
            for p in paths:
                if p.name in self._seen:
                    continue
                try:
                    entry = json.loads(p.read_text())
                except (OSError, json.JSONDecodeError):
                    continue  # written atomically, so only an unreadable file: try again next time
                self._seen.add(p.name)
                self._entries.append(entry)
                print(status_line(entry, len(self._entries), self._total, self._show), flush=True)

    def _finish(self) -> None:
        if self._pid != os.getpid() or self._finished or self._lock is None:
            return
        self._finished = True
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._drain()
        print(self.summary(), flush=True)

    def summary(self) -> str:
        es = self._entries
        n = {s: sum(e["status"] == s for e in es) for s in ("done", "failed", "skipped")}
        total = self._total if self._total is not None else len(es)
        job_s = sum(e.get("wall_s") or 0.0 for e in es if e["status"] != "skipped")
        lines = [f"[sweep] {total} jobs: {n['done']} done, {n['failed']} failed, {n['skipped']} skipped"
                 + (f", {total - len(es)} not reported" if total > len(es) else "")
                 + f" in {fmt_seconds(time.time() - self._t0)} (jobs {fmt_seconds(job_s)});"
                 f" records in {self._results}/runs; sweep folder {self._dir.parent if self._dir else '?'}"]
        for e in es:
            if e["status"] == "failed":
                lines.append(f"[sweep] failed #{e.get('num')}: {shown_name(e, self._show)} ({e.get('reason')})"
                             + (f" record {e['record']}" if e.get("record") else ""))
        if n["failed"] or total > len(es):
            lines.append("[sweep] list what is missing: python -m bench.status --sweep "
                         f"{self._dir.parent if self._dir else '<sweep dir>'}; run only that: "
                         "the same command with skip_done=true")
        return "\n".join(lines)

    # ------------------------------------------------------------------ job process (any launcher)
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.enabled and _is_multirun(config):
            self._job_t0[OmegaConf.select(config, "hydra.job.num")] = time.perf_counter()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.enabled or not _is_multirun(config):
            return
        try:
            from bench.results import write_json_atomic

            num = OmegaConf.select(config, "hydra.job.num")
            t0 = self._job_t0.pop(num, None)
            entry = job_entry(config, job_return, None if t0 is None else time.perf_counter() - t0)
            folder = Path(str(config.hydra.sweep.dir)).resolve() / STATUS_DIR
            write_json_atomic(folder / f"{int(num):06d}.json" if num is not None else
                              folder / f"pid{os.getpid()}-{time.time_ns()}.json", entry)
        except Exception as e:  # noqa: BLE001  (bookkeeping never fails a job)
            print(f"warning: sweep status not written: {e}", file=sys.stderr)
            return
        if self._pid == os.getpid():  # in-process launcher: print now instead of at the next poll
            self._drain()
