"""Check a VTAB-1k or FGVC data folder before training on it.

    python -m tools.check_data vtab /path/to/vtab-1k [--only dtd,svhn] [--decode] [--workers 8]
    python -m tools.check_data fgvc /path/to/fgvc
    python -m tools.check_data video /path/to/video [--only ssv2,hmdb51] [--decode]

Per dataset it reports: whether the folder was found (and under which spelling), each list/split
file's number of lines (entries) against the expected count, its sha256 against the table committed
in ``tools/data_table.json`` (``ok`` / ``MISMATCH`` / ``unknown`` when no hash is recorded), label
range / class count, and how many listed images cannot be read. By default an image is "readable"
when PIL can open it and parse its header (fast); ``--decode`` decodes every pixel (slow, catches
truncated files). Exit status 0 when every checked dataset is complete and clean, 1 otherwise.

Video (``video ROOT``): ROOT holds the dataset folders (``ssv2/``, ``hmdb51/``, ``k400/`` or the spellings in
``datasets/video.py``; with ``--only`` naming one dataset ROOT may be that folder itself). Per dataset: each
csv's line count (against the table; Kinetics-400's varies and is not checked) and sha256, malformed lines,
the label range against the class count, and the videos that are missing or that decord cannot open or that
have no frames, each with its csv file and line; ``--decode`` decodes every frame.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

TABLE = Path(__file__).with_name("data_table.json")


def load_table() -> dict:
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)


def image_problem(path: Path, decode: bool) -> str | None:
    """None if the image reads, else a short reason."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            else:
                _ = im.size, im.mode
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # PIL raises many exception types
        return f"{type(e).__name__}: {e}"
    return None


def check_images(entries: list[tuple[Path, str]], decode: bool, workers: int) -> list[str]:
    """entries: (image path, where it is listed). Returns one line per unreadable image."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        problems = list(pool.map(lambda e: image_problem(e[0], decode), entries))
    return [f"{path} ({where}): {why}" for (path, where), why in zip(entries, problems) if why]


def hash_status(actual: str, expected: str) -> str:
    if not expected or expected == "unknown":
        return "unknown"
    return "ok" if actual == expected else "MISMATCH"


def file_row(path: Path, lines: int | None, want: dict) -> dict:
    """A list file's report entry: its count against the table's, and its sha256 (``lines`` None = missing)."""
    from datasets.images import sha256_file

    if lines is None:
        return {"lines": None, "expected": want["lines"], "sha256": None, "hash": "missing"}
    digest = sha256_file(path)
    return {"lines": lines, "expected": want["lines"], "sha256": digest,
            "hash": hash_status(digest, want.get("sha256"))}


def check_vtab(root: Path, only, decode: bool, workers: int, table: dict) -> list[dict]:
    from datasets.base import DataError
    from datasets.vtab import LIST_FILES, VTAB_TASKS, find_task_dir, read_list

    rows = []
    for task in VTAB_TASKS:
        if only and task not in only:
            continue
        exp = table["vtab"][task]
        row = {"dataset": task, "found": None, "files": {}, "unreadable": [], "errors": []}
        rows.append(row)
        try:
            folder = find_task_dir(root, task)
        except DataError:
            continue
        row["found"] = str(folder)
        entries = {}
        for split, fname in LIST_FILES.items():
            path = folder / fname
            want = exp["files"][fname]
            if not path.is_file():
                row["files"][fname] = file_row(path, None, want)
                continue
            try:
                items = read_list(path, folder, exp["classes"])
            except DataError as e:
                row["errors"].append(str(e))
                items = []
            row["files"][fname] = file_row(path, len(items), want)
            for it in items:
                entries.setdefault(it.path, it.source)
        row["unreadable"] = check_images(list(entries.items()), decode, workers)
    return rows


def check_fgvc(root: Path, only, decode: bool, workers: int, table: dict) -> list[dict]:
    from datasets.base import DataError
    from datasets.fgvc import FGVC_DATASETS, SPLIT_FILES, class_mapping, find_dataset_dir, read_split

    rows = []
    for key in FGVC_DATASETS:
        if only and key not in only:
            continue
        exp = table["fgvc"][key]
        row = {"dataset": key, "found": None, "files": {}, "unreadable": [], "errors": []}
        rows.append(row)
        try:
            folder = find_dataset_dir(root, key)
        except DataError:
            continue
        row["found"] = str(folder)
        image_dir = folder / exp["image_dir"]
        if not image_dir.is_dir():
            row["errors"].append(f"image folder {image_dir} missing")
        annos, entries = {}, {}
        for split, fname in SPLIT_FILES.items():
            path = folder / fname
            want = exp["files"][fname]
            if not path.is_file():
                row["files"][fname] = file_row(path, None, want)
                continue
            try:
                annos[split] = read_split(path)
            except DataError as e:
                row["errors"].append(str(e))
                annos[split] = {}
            row["files"][fname] = file_row(path, len(annos[split]), want)
            for k in annos[split]:
                entries.setdefault(image_dir / k, f"{path} key {k!r}")
        try:
            classes = len(class_mapping(annos))
            if classes != exp["classes"]:
                row["errors"].append(f"{classes} classes in the union of the splits, expected {exp['classes']}")
        except DataError as e:
            row["errors"].append(str(e))
        row["unreadable"] = check_images(list(entries.items()), decode, workers)
    return rows


def video_problem(path: Path, decode: bool) -> str | None:
    """None if decord opens the video and finds frames (and, with ``decode``, decodes them all), else why."""
    from datasets.video import decord_module

    if not path.is_file():
        return "missing"
    decord = decord_module()
    try:
        reader = decord.VideoReader(str(path), num_threads=1, ctx=decord.cpu(0))
        n = len(reader)
        if n == 0:
            return "no frames"
        if decode:
            for i in range(0, n, 32):
                reader.get_batch(list(range(i, min(n, i + 32)))).asnumpy()
    except Exception as e:  # decord raises RuntimeError / DECORDError with multi-line messages
        return f"{type(e).__name__}: {' '.join(str(e).split())[-200:]}"
    return None


def locate_video(root: Path, key: str, only) -> Path | None:
    from datasets.video import CSV_FILES, VIDEO_DATASETS

    for name in VIDEO_DATASETS[key][1]:
        if (root / name / CSV_FILES["train_csv"]).is_file():
            return root / name
    if set(only) == {key} and (root / CSV_FILES["train_csv"]).is_file():
        return root
    return None


def check_video(root: Path, only, decode: bool, workers: int, table: dict) -> list[dict]:
    from datasets.video import VIDEO_DATASETS, read_annotations

    rows = []
    for key in VIDEO_DATASETS:
        if only and key not in only:
            continue
        exp = table["video"][key]
        classes = exp["classes"]
        row = {"dataset": key, "found": None, "files": {}, "labels": {}, "unreadable": [], "errors": []}
        rows.append(row)
        folder = locate_video(root, key, only)
        if folder is None:
            continue
        row["found"] = str(folder)
        entries = {}
        for fname, want in exp["files"].items():
            path = folder / fname
            if not path.is_file():
                row["files"][fname] = file_row(path, None, want)
                continue
            bad: list[str] = []
            items = read_annotations(path, folder, None, problems=bad)
            row["errors"] += bad
            labels = [it.label for it in items]
            outside = [it.source for it in items if not 0 <= it.label < classes]
            if outside:
                row["errors"].append(f"{fname}: {len(outside)} label(s) outside [0, {classes}) (first: {outside[0]})")
            row["labels"][fname] = {"min": min(labels, default=None), "max": max(labels, default=None),
                                    "distinct": len(set(labels)), "classes": classes}
            row["files"][fname] = file_row(path, len(items), want)
            for it in items:
                entries.setdefault(it.path, it.source)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            problems = list(pool.map(lambda p: video_problem(p, decode), entries))
        row["unreadable"] = [f"{p} ({where}): {why}" for (p, where), why in zip(entries.items(), problems) if why]
    return rows


def is_clean(row: dict) -> bool:
    """Found, every file present with the expected count (if one is known), no other error, every file readable."""
    return (row["found"] is not None and not row["errors"] and not row["unreadable"]
            and all(f["lines"] is not None and (f["expected"] is None or f["lines"] == f["expected"])
                    for f in row["files"].values()))


def report(benchmark: str, root: Path, rows: list[dict], max_listed: int = 5) -> str:
    unit = "entries" if benchmark == "fgvc" else "lines"
    what = "videos" if benchmark == "video" else "images"
    lines = [f"{benchmark} data under {root}"]
    for r in rows:
        if r["found"] is None:
            lines.append(f"  {r['dataset']:<22} NOT FOUND")
            continue
        ok = is_clean(r)
        lines.append(f"  {r['dataset']:<22} {'OK' if ok else 'PROBLEMS'}  found {r['found']}")
        for fname, f in r["files"].items():
            if f["lines"] is None:
                lines.append(f"    {fname:<20} MISSING (expected {f['expected']} {unit})")
                continue
            if f["expected"] is None:
                count, expected = "", "?"
            else:
                count, expected = ("ok" if f["lines"] == f["expected"] else "WRONG"), f["expected"]
            lines.append(f"    {fname:<20} {unit} {f['lines']:>6} / {expected:<6} {count:<5}  "
                         f"sha256 {f['sha256']} {f['hash']}")
            lab = r.get("labels", {}).get(fname)
            if lab and lab["min"] is not None:
                lines.append(f"    {'':<20} labels {lab['min']}..{lab['max']} ({lab['distinct']} distinct) "
                             f"of {lab['classes']} classes")
        lines.append(f"    unreadable {what}: {len(r['unreadable'])}")
        for u in r["unreadable"][:max_listed]:
            lines.append(f"      {u}")
        if len(r["unreadable"]) > max_listed:
            lines.append(f"      ... and {len(r['unreadable']) - max_listed} more")
        for e in r["errors"]:
            lines.append(f"    error: {e}")
    found = sum(r["found"] is not None for r in rows)
    clean = sum(is_clean(r) for r in rows)
    lines.append(f"{found}/{len(rows)} found, {clean} complete and readable")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.check_data", description=__doc__.split("\n\n")[0])
    p.add_argument("benchmark", choices=["vtab", "fgvc", "video"])
    p.add_argument("root", help="folder holding the dataset folders (e.g. /data/vtab-1k, /data/fgvc or /data/video)")
    p.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    p.add_argument("--decode", action="store_true",
                   help="decode every image / video frame fully (slow; catches truncated files)")
    p.add_argument("--workers", type=int, default=8, help="threads reading images")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the text report")
    args = p.parse_args(argv)
    root = Path(args.root).expanduser()
    if not root.is_dir():
        print(f"{root} does not exist or is not a folder; pass the folder holding the {args.benchmark} datasets "
              "(see README 'Getting the data')", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    only = {s for s in args.only.split(",") if s}
    table = load_table()
    known = set(table[args.benchmark])
    if only - known:
        print(f"--only: unknown {args.benchmark} dataset(s) {', '.join(sorted(only - known))}; "
              f"choose from {', '.join(sorted(known))}", file=sys.stderr)
        return 2
    check = {"vtab": check_vtab, "fgvc": check_fgvc, "video": check_video}[args.benchmark]
    rows = check(root, only, args.decode, args.workers, table)
    print(json.dumps(rows, indent=1) if args.json else report(args.benchmark, root, rows))
    return 0 if all(is_clean(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
