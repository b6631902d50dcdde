"""tools.estimate_sweep arithmetic and table parsing; tools.bench_epoch on a tiny ViT; bench_step's JSON."""
import json

import pytest

from tools import bench_epoch, bench_step, estimate_sweep

TINY_SET = ["--set", "backbone.checkpoint=null", "--set", "backbone.depth=2", "--set", "backbone.embed_dim=32",
            "--set", "backbone.num_heads=2"]

MD = """# Step time per method

- backbone `vit_b16`, batch 10, 224 px, device `cpu`, fp32, 2 CPU threads
- ...

| method | trainable params | ms/step | × full | × linear | peak mem (MiB) | mem × full | mem × lora |
|---|---:|---:|---:|---:|---:|---:|---:|
| full | 100 | 2,000.0 | 1.00× | n/a | 1 | 1.00× | n/a |
| a | 10 | 1000.0 | 0.50× | n/a | 1 | 1.00× | n/a |
| broken | – | failed: boom | | | | | |

## a separate run

| method | trainable params | ms/step | × full | × linear | peak mem (MiB) | mem × full | mem × lora |
|---|---:|---:|---:|---:|---:|---:|---:|
| full | 100 | 4000.0 | 1.00× | n/a | 1 | 1.00× | n/a |
| b | 10 | 3000.0 | 0.75× | n/a | 1 | 1.00× | n/a |
"""


def test_markdown_tables_are_parsed_and_a_second_run_rescaled_by_full():
    t = estimate_sweep.parse_markdown(MD)
    assert t["meta"] == {"backbone": "vit_b16", "batch": 10, "img_size": 224, "device": "cpu", "dtype": "fp32",
                         "threads": 2}
    assert t["ms"] == {"full": 2000.0, "a": 1000.0, "b": 1500.0}  # b: 3000 × (2000 / 4000); failed rows skipped
    assert "rescaled ×0.500" in t["notes"][0]


def test_estimate_arithmetic_on_a_hand_made_table():
    table = {"meta": {"batch": 10, "device": "cpu"}, "ms": {"a": 1000.0, "b": 2000.0}}
    recipes = {("a", "d1"): (2, 10, True), ("b", "d1"): (1, 20, False)}
    est = estimate_sweep.estimate(table, {"d1": (25, 30)}, seeds=2, eval_factor=0.5,
                                  recipe_of=lambda m, d: recipes[(m, d)])
    a, b = est["rows"]
    # a: 0.1 s/image; 2 epochs × ceil(25/10)=3 steps × 10 = 60 images per run; eval 30 × 0.1 × 0.5 = 1.5 s
    assert a["train_images"] == 120 and a["train_h"] * 3600 == pytest.approx(12.0)
    assert a["eval_h"] * 3600 == pytest.approx(3.0) and a["no_recipe"] == 0 and a["runs"] == 2
    # b: 0.2 s/image; 1 epoch × ceil(25/20)=2 steps × 20 = 40 images per run; eval 30 × 0.2 × 0.5 = 3 s
    assert b["train_h"] * 3600 == pytest.approx(16.0) and b["eval_h"] * 3600 == pytest.approx(6.0)
    assert b["no_recipe"] == 1
    assert est["total_h"] * 3600 == pytest.approx(37.0) and est["runs"] == 4
    with pytest.raises(ValueError, match="no step time for c"):
        estimate_sweep.estimate(table, {"d1": (1, 1)}, methods=["c"], recipe_of=lambda m, d: (1, 1, True))
    text = estimate_sweep.render(est, table, "vtab1k", "t.md", 0.5)
    assert "estimated from measured step times" in text and "CPU-hours" in text and "GPU-hours" not in text
    gpu = {"meta": {"batch": 10, "device": "cuda:0", "device_name": "NVIDIA H200"}, "ms": table["ms"]}
    assert "GPU-hours" in estimate_sweep.render(est, gpu, "vtab1k", "t.json", 0.5)


def test_sweeps_and_recipes():
    from bench import CONF_DIR

    v = estimate_sweep.sweep_datasets("vtab1k")
    assert len(v) == 19 and v["vtab/cifar100"] == (1000, 10000)
    assert estimate_sweep.sweep_datasets("fgvc")["fgvc/cub"] == (5394, 5794)
    assert len(estimate_sweep.sweep_datasets("all")) == 24
    assert estimate_sweep.recipe("lora", "vtab/cifar100", CONF_DIR) == (100, 64, True)
    assert estimate_sweep.recipe("mona", "vtab/cifar100", CONF_DIR)[2] is False


def test_bench_step_json_feeds_the_estimator(tmp_path, capsys):
    out = tmp_path / "step.md"
    assert bench_step.main(["--methods", "lora", "--in-process", "--out", str(out), "--backbone", "vit_micro",
                            "--batch", "4", "--steps", "1", "--warmup", "0", "--threads", "1", *TINY_SET]) == 0
    d = json.loads(out.with_suffix(".json").read_text())
    assert d["meta"]["device"] == "cpu" and d["meta"]["batch"] == 4 and d["results"][0]["method"] == "lora"
    est_md = tmp_path / "est.md"
    assert estimate_sweep.main(["--table", str(out.with_suffix(".json")), "--sweep", "vtab1k", "--out", str(est_md)]) == 0
    text = est_md.read_text()
    assert "| lora |" in text and "CPU-hours" in text and "| **total** | | 57 |" in text


def test_bench_epoch_writes_the_ratio(tmp_path, capsys):
    out = tmp_path / "epoch.md"
    args = ["--device", "cpu", "--images", "32", "--batch", "16", "--repeats", "1", "--warmup-epochs", "0",
            "--threads", "1", "--out", str(out), *TINY_SET]
    assert bench_epoch.main(args + ["--paths", "loader,device"]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["path"] for r in rows] == ["loader", "device"]
    for r in rows:
        assert r["steps"] == 2 and r["epoch_s"] > 0 and r["pure_s"] > 0
        assert r["ratio"] == pytest.approx(r["epoch_s"] / r["pure_s"])
    assert "| ratio |" in out.read_text() and f"{rows[1]['ratio']:.3f}×" in out.read_text()
    assert bench_epoch.main(args + ["--paths", "device"]) == 0  # a re-run replaces its row
    assert len(json.loads(out.with_suffix(".json").read_text())) == 2
