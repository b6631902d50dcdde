"""``python -m tools.check_data`` on tiny VTAB/FGVC fixtures, and end-to-end runs on them."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ROOT
from data_fixtures import FGVC_SPLITS, VTAB_SIZES, make_fgvc_dataset, make_vtab_task
from datasets.fgvc import FGVC_DATASETS
from datasets.images import sha256_file
from datasets.vtab import VTAB_TASKS
from helpers import compose_cfg
from tools import check_data


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    vt = tmp_path_factory.mktemp("vtab-1k")
    make_vtab_task(vt, "cifar", 100, seed=1)
    make_vtab_task(vt, "dtd", 47, seed=2)
    make_vtab_task(vt, "eurosat", 10, seed=5)
    (vt / "eurosat/images/val200/000001.jpg").write_bytes(b"not an image")
    fg = tmp_path_factory.mktemp("fgvc")
    make_fgvc_dataset(fg, "OxfordFlower", "", seed=3)
    return vt, fg


def fixture_table(vt: Path) -> dict:
    """The committed table with the fixture's line counts (and one known hash) filled in."""
    table = copy.deepcopy(check_data.load_table())
    for task in ("cifar100", "dtd", "eurosat"):
        files = table["vtab"][task]["files"]
        files["train800.txt"]["lines"], files["val200.txt"]["lines"] = VTAB_SIZES["train800"], VTAB_SIZES["val200"]
        files["train800val200.txt"]["lines"], files["test.txt"]["lines"] = 12, VTAB_SIZES["test"]
    table["vtab"]["cifar100"]["files"]["test.txt"]["sha256"] = sha256_file(vt / "cifar/test.txt")
    table["vtab"]["eurosat"]["files"]["test.txt"]["sha256"] = "0" * 64
    return table


def test_committed_table_matches_the_loaders():
    table = check_data.load_table()
    assert set(table["vtab"]) == set(VTAB_TASKS) and set(table["fgvc"]) == set(FGVC_DATASETS)
    for task, (classes, group, test) in VTAB_TASKS.items():
        row = table["vtab"][task]
        assert (row["classes"], row["group"]) == (classes, group)
        assert [f["lines"] for f in row["files"].values()] == [800, 200, 1000, test]
    assert sum(r["classes"] for r in table["vtab"].values()) == 940
    assert {k: [f["lines"] for f in r["files"].values()] for k, r in table["fgvc"].items()} == {
        "cub": [5394, 600, 5794], "nabirds": [21536, 2393, 24633], "flowers": [1020, 1020, 6149],
        "dogs": [10800, 1200, 8580], "cars": [7329, 815, 8041]}


def test_check_vtab_rows(roots):
    vt, _ = roots
    rows = {r["dataset"]: r for r in check_data.check_vtab(vt, set(), False, 2, fixture_table(vt))}
    assert len(rows) == 19 and sum(r["found"] is not None for r in rows.values()) == 3
    c = rows["cifar100"]
    assert c["found"].endswith("/cifar") and not c["errors"] and not c["unreadable"]
    assert {f: v["lines"] for f, v in c["files"].items()} == {
        "train800.txt": 8, "val200.txt": 4, "train800val200.txt": 12, "test.txt": 6}
    assert c["files"]["test.txt"]["hash"] == "ok" and c["files"]["train800.txt"]["hash"] == "unknown"
    assert not rows["dtd"]["errors"] and not rows["dtd"]["unreadable"]
    d = rows["eurosat"]
    assert d["files"]["test.txt"]["hash"] == "MISMATCH"
    assert len(d["unreadable"]) == 1 and "val200.txt line 2" in d["unreadable"][0]
    # against the committed table the fixture's counts are wrong, and it says so
    plain = {r["dataset"]: r for r in check_data.check_vtab(vt, {"cifar100"}, True, 2, check_data.load_table())}
    assert list(plain) == ["cifar100"]
    assert plain["cifar100"]["files"]["train800.txt"] == {
        "lines": 8, "expected": 800, "sha256": sha256_file(vt / "cifar/train800.txt"), "hash": "unknown"}
    assert not check_data.is_clean(plain["cifar100"]) and check_data.is_clean(c)


def test_check_fgvc_rows(roots):
    _, fg = roots
    table = copy.deepcopy(check_data.load_table())
    table["fgvc"]["flowers"]["classes"] = 3
    for split, anno in FGVC_SPLITS.items():
        table["fgvc"]["flowers"]["files"][f"{split}.json"]["lines"] = len(anno)
    rows = {r["dataset"]: r for r in check_data.check_fgvc(fg, set(), True, 2, table)}
    f = rows["flowers"]
    assert f["found"].endswith("OxfordFlower") and check_data.is_clean(f)
    assert [v["lines"] for v in f["files"].values()] == [6, 2, 3]
    assert rows["cub"]["found"] is None
    strict = check_data.check_fgvc(fg, {"flowers"}, False, 2, check_data.load_table())[0]
    assert "3 classes in the union of the splits, expected 102" in strict["errors"]


def test_check_data_cli(roots):
    vt, fg = roots
    out = subprocess.run([sys.executable, "-m", "tools.check_data", "vtab", str(vt), "--only", "cifar100,eurosat"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    text = out.stdout
    assert "cifar100" in text and "found " + str(vt / "cifar") in text
    assert "train800.txt         lines      8 / 800    WRONG" in text
    assert "unreadable images: 1" in text and "val200.txt line 2" in text
    assert text.strip().endswith("2/2 found, 0 complete and readable")

def test_check_data_main_in_process(roots, capsys):
    vt, fg = roots
    assert check_data.main(["fgvc", str(fg), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [r["dataset"] for r in rows] == list(FGVC_DATASETS) and rows[2]["found"].endswith("OxfordFlower")
    assert check_data.main(["vtab", str(vt / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Getting the data" in err
    assert check_data.main(["vtab", str(vt), "--only", "cifar10"]) == 2
    assert "unknown vtab dataset(s) cifar10" in capsys.readouterr().err


TINY = ["backbone=vit_micro", "backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2",
        "backbone.patch_size=8", "method=linear", "train.epochs=1", "train.batch_size=4", "train.warmup_epochs=0",
        "progress=false", "device=cpu", "eval.batch_size=8"]


@pytest.mark.parametrize("dataset,extra,train_split,test_split,n_test", [
    ("vtab/cifar100", ["eval.select=last"], "train800val200", "test", 6),
    ("vtab/dtd", ["eval.select=best_val", "dataset.train_aug=true"], "train800", "test", 6),
    ("fgvc/flowers", ["eval.select=last", "dataset.num_classes=3", "dataset.roles.trainval=train+val"], "train+val",
     "test", 3),
])
def test_end_to_end_writes_a_record(roots, tmp_path, dataset, extra, train_split, test_split, n_test):
    from bench.run import run

    vt, fg = roots
    root = fg if dataset.startswith("fgvc") else vt
    overrides = [f"dataset={dataset}", f"dataset.root={root}", f"results.dir={tmp_path}", *TINY, *extra]
    rec = run(compose_cfg(overrides), overrides)
    assert Path(rec["_path"]).is_file()
    saved = json.loads(Path(rec["_path"]).read_text())
    assert saved["dataset"] == dataset and saved["benchmark"] == dataset.split("/")[0]
    assert saved["protocol"]["train_split"] == train_split and saved["protocol"]["eval_split"] == test_split
    assert saved["protocol"]["image_size"] == 32 and 0.0 <= saved["top1"] <= 100.0
    assert saved["task_info"]["transform"]["eval"].startswith("Resize(")
    assert test_split in saved["task_info"]["cache"]
    # top-1 is a multiple of 1/n_test
    assert abs(saved["top1"] * n_test / 100 - round(saved["top1"] * n_test / 100)) < 1e-6
