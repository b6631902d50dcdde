"""Result records: one JSON file per run, written atomically (temp file + rename)."""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


def safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", str(s)).strip("_") or "_"


def record_path(results_dir: str | Path, rec: dict) -> Path:
    """``<dir>/runs/<benchmark>/<dataset>/<method>[<variant>]/<backbone>-seed<seed>-<stamp>.json``."""
    method = rec["method"] + (f"__{safe(rec['variant'])}" if rec.get("variant") else "")
    name = f"{safe(rec['backbone'])}-seed{rec['seed']}-{rec['run_id']}.json"
    return Path(results_dir) / "runs" / safe(rec["benchmark"]) / safe(rec["dataset"].split("/")[-1]) / safe(method) / name


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: Path, obj: Any) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_record(results_dir: str | Path, rec: dict) -> Path:
    return write_json_atomic(record_path(results_dir, rec), rec)


def load_records(results_dir: str | Path) -> list[dict]:
    """Every record under ``<dir>/runs`` (temp files and unreadable files are skipped)."""
    out = []
    for p in sorted((Path(results_dir) / "runs").rglob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and "method" in rec:
            rec["_path"] = str(p)
            out.append(rec)
    return out
