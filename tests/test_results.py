import json
import os

import pytest

from bench.leaderboard import main as leaderboard_main
from bench.leaderboard import regenerate
from bench.metrics import ppt
from bench.results import load_records, record_path, write_json_atomic, write_record


@pytest.mark.parametrize("top1,params,expected", [
    (0.7144, 0.16e6, 0.7095), (0.7170, 2.38e6, 0.6535), (0.5294, 0, 0.5294), (0.9074, 0.25e6, 0.8977)])
def test_ppt_reproduces_vpetl_tables(top1, params, expected):
    assert round(ppt(top1, params), 4) == expected


def fake_record(method="lora", dataset="synthetic/dsprites_loc", seed=0, top1=50.0, params=1000, variant="",
                select="last", score=None, created="2026-01-01T00:00:00", epochs=None):
    return {
        "schema": 1, "status": "ok", "run_id": f"{method}{variant}{dataset}{seed}{created}".replace("/", "_"),
        "created": created, "benchmark": "embedded", "dataset": dataset, "backbone": "vit_micro",
        "method": method, "variant": variant, "seed": seed, "top1": top1, "trainable_params": params,
        "head_params": 10, "total_params": 10 ** 6,
        "protocol": {"select": select, "train_split": "train800val200", "eval_split": "test", "select_score": score,
                     **({"schedule": {"epochs": epochs}} if epochs is not None else {})},
        "config": {"dataset": {"name": dataset}},
    }


def test_record_written_atomically(tmp_path, monkeypatch):
    rec = fake_record()
    path = write_record(tmp_path, rec)
    assert json.loads(path.read_text())["top1"] == 50.0
    assert path == record_path(tmp_path, rec)
    assert not list(path.parent.glob("*.tmp"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        write_json_atomic(path, {"top1": 1.0})
    assert json.loads(path.read_text())["top1"] == 50.0  # old record intact
    assert not list(path.parent.glob("*.tmp")), "temp file left behind"


def test_leaderboard_from_fixture_records(tmp_path):
    for seed, acc in enumerate([60.0, 62.0, 64.0]):
        write_record(tmp_path, fake_record("lora", seed=seed, top1=acc, params=294912))
        write_record(tmp_path, fake_record("lora", "synthetic/dsprites_ori", seed=seed, top1=acc - 20, params=294912))
    write_record(tmp_path, fake_record("linear", seed=0, top1=40.0, params=0))
    write_record(tmp_path, fake_record("full", seed=0, top1=70.0, params=85_798_656))
    # a re-run of the same seed replaces the older record
    write_record(tmp_path, fake_record("linear", seed=0, top1=41.0, params=0, created="2026-02-01T00:00:00"))
    paths = regenerate(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == ["embedded/leaderboard.md",
                                                                    "embedded/pareto_vit_micro_last.png"]
    text = paths[0].read_text()
    png = paths[1].read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "62.0 ± 2.0 (n=3)" in text and "42.0 ± 2.0 (n=3)" in text
    assert "41.0 (n=1)" in text and "40.0 (n=1)" not in text
    lora_row = next(l for l in text.splitlines() if l.startswith("| lora"))
    assert "52.0" in lora_row and "0.295" in lora_row and f"{ppt(0.52, 294912):.2f}" in lora_row
    full_row = next(l for l in text.splitlines() if l.startswith("| full"))
    assert full_row.rstrip(" |").endswith("-")  # PPT not defined for full fine-tuning
    assert "eval.select=last" in text
    regenerate(tmp_path)
    assert paths[0].read_text() == text, "regeneration must be deterministic"
    assert paths[1].read_bytes() == png, "the plot too"


def test_pareto_front_keeps_undominated_methods():
    import pandas as pd

    from bench.pareto import pareto_front

    pts = pd.DataFrame({"label": ["linear", "bitfit", "lora", "adapter", "full"],
                        "params": [0, 100, 1000, 1000, 10 ** 6], "score": [20.0, 15.0, 60.0, 55.0, 58.0]})
    assert list(pareto_front(pts)["label"]) == ["linear", "lora"]


def test_schedules_are_separate_rows(tmp_path):
    """The default job's 10-epoch lora run never merges into a 3-epoch sweep's lora row."""
    write_record(tmp_path, fake_record("lora", seed=0, top1=30.0, epochs=3))
    write_record(tmp_path, fake_record("lora", seed=0, top1=68.0, epochs=10, created="2026-02-01T00:00:00"))
    write_record(tmp_path, fake_record("linear", seed=0, top1=15.0, epochs=3))
    text = regenerate(tmp_path)[0].read_text()
    rows = [l for l in text.splitlines() if l.startswith("| lora") or l.startswith("| linear")]
    assert any(l.startswith("| lora [3 ep]") and "30.0" in l for l in rows)
    assert any(l.startswith("| lora [10 ep]") and "68.0" in l for l in rows)
    assert any(l.startswith("| linear ") for l in rows) and "Epochs: 3, 10." in text


def test_leaderboard_rows_per_budget_and_val_selection(tmp_path):
    for v, params, val, test in [("budget=0.2M", 200_000, 80.0, 70.0), ("budget=0.4M", 400_000, 85.0, 72.0)]:
        write_record(tmp_path, fake_record("spt_lora", variant=v, params=params, top1=test, select="best_val", score=val))
    write_record(tmp_path, fake_record("lora", top1=1.0, select="best_test"))
    text = regenerate(tmp_path)[0].read_text()
    assert "| spt_lora [budget=0.2M]" in text and "| spt_lora [budget=0.4M]" in text
    chosen = next(l for l in text.splitlines() if "variant chosen on val" in l and l.startswith("|"))
    assert "72.0" in chosen
    assert "spt_lora [variant chosen on val]: dsprites_loc: budget=0.4M" in text
    assert "TEST-SELECTED" in text


def test_leaderboard_cli(tmp_path, capsys):
    assert leaderboard_main([f"results.dir={tmp_path}"]) == 2  # no records yet: one-line error
    assert "no records under" in capsys.readouterr().err
    write_record(tmp_path, fake_record())
    assert leaderboard_main([f"results.dir={tmp_path}"]) == 0
    assert (tmp_path / "embedded" / "leaderboard.md").is_file()
    assert len(load_records(tmp_path)) == 1


def test_vtab_leaderboard_group_means_and_published_rows(tmp_path):
    rows = {"cifar100": ("natural", 70.0), "eurosat": ("specialized", 95.0), "dmlab": ("structured", 50.0)}
    for ds, (group, acc) in rows.items():
        rec = fake_record("adapter", dataset=f"vtab/{ds}", top1=acc, params=156_768)
        rec.update(benchmark="vtab", backbone="vit_b16")
        rec["config"]["dataset"]["group"] = group
        write_record(tmp_path, rec)
    text = regenerate(tmp_path)[0].read_text()
    header = next(l for l in text.splitlines() if l.startswith("| method"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[1:4] == ["cifar100", "eurosat", "dmlab"]  # VTAB's canonical order
    assert {"natural mean", "specialized mean", "structured mean", "mean", "params (M)", "PPT"} <= set(cols)
    ours = next(l for l in text.splitlines() if l.startswith("| adapter "))
    assert "70.0 (n=1)" in ours and "71.7*" in ours  # * = not all 19 tasks present
    published = next(l for l in text.splitlines() if l.startswith("| adapter (published)"))
    assert "69.2 (Δ +0.8)" in published and "71.4" in published  # V-PETL README: cifar100 69.2, mean 71.44
    assert "V-PETL Bench README" in text


def dense_record(method, seed, box, mask, params, mem, created="2026-01-01T00:00:00"):
    return {
        "schema": 1, "status": "ok", "run_id": f"{method}{seed}{created}", "created": created, "benchmark": "coco",
        "dataset": "dense/coco", "backbone": "swin_b", "method": method, "variant": "", "seed": seed,
        "kind": "detection", "config_hash": f"h{method}{seed}", "metric": "box_ap", "score": box,
        "metrics": {"box_ap": box, "box_ap50": box + 20, "mask_ap": mask}, "trainable_params": params,
        "head_params": 10, "total_params": 10 ** 6,
        "perf": {"peak_mem_mb": mem, "peak_mem_kind": "cuda_max_allocated"},
        "protocol": {"select": "last", "train_split": "train2017", "eval_split": "val2017"},
        "config": {"dataset": {"name": "dense/coco", "leaderboard_metrics": ["box_ap", "mask_ap"]}},
    }


def test_dense_leaderboard_tables_memory_and_published(tmp_path):
    """COCO: one table per headline metric (box AP, mask AP), the anchors' Memory column beside ours, and the
    published rows (results/reference/vpetl_dense.csv) with their memory and PPT."""
    write_record(tmp_path, dense_record("lora", 0, 50.0, 43.0, 3_080_192, 12000.0))
    write_record(tmp_path, dense_record("lora", 1, 52.0, 45.0, 3_080_192, 12200.0))
    write_record(tmp_path, dense_record("linear", 0, 40.0, 35.0, 0, 7000.0))
    paths = regenerate(tmp_path)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert names == ["coco/leaderboard.md", "coco/pareto_swin_b_last_box_ap.png", "coco/pareto_swin_b_last_mask_ap.png"]
    text = (tmp_path / "coco" / "leaderboard.md").read_text()
    box, mask = text.split("metric mask_ap")
    assert "metric box_ap" in box
    lora_box = next(l for l in box.splitlines() if l.startswith("| lora "))
    assert "51.0 ± 1.4 (n=2)" in lora_box and "12,100" in lora_box
    lora_mask = next(l for l in mask.splitlines() if l.startswith("| lora "))
    assert "44.0 ± 1.4 (n=2)" in lora_mask
    pub = next(l for l in box.splitlines() if l.startswith("| lora (published)"))
    assert "51.2 (Δ -0.2)" in pub and "11,975 (published)" in pub and f"{ppt(0.512, 3.03e6):.2f}" in pub
    assert "| mona (published)" in mask and "46.0" in next(l for l in mask.splitlines() if "mona (published)" in l)
    assert "cuda_max_allocated" in text
