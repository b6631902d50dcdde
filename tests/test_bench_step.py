"""The step-time tool on a tiny ViT: numbers, ratios, memory column and the markdown table."""
import json
import sys

import pytest

from tools import bench_step

TINY = ["--backbone", "vit_micro", "--set", "backbone.checkpoint=null", "--set", "backbone.depth=2", "--set", "backbone.embed_dim=32",
        "--set", "backbone.num_heads=2", "--batch", "4", "--steps", "2", "--warmup", "1", "--threads", "1"]


def test_in_process_table_ratios_and_counts(tmp_path, capsys):
    out = tmp_path / "step.md"
    rc = bench_step.main(["--methods", "full,linear,lora", "--in-process", "--out", str(out), *TINY])
    assert rc == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    by = {r["method"]: r for r in rows}
    assert set(by) == {"full", "linear", "lora"}
    # tiny ViT (dim 32, depth 2, mlp 2x, 32 px / patch 8) with 100 classes: head 3,300
    assert by["linear"]["trainable_params"] == 0 and by["lora"]["trainable_params"] == 2 * 2 * 2 * 32 * 8
    assert by["full"]["head_params"] == 33 * 100
    for r in rows:
        assert r["steps"] == 2 and r["warmup"] == 1 and r["batch"] == 4 and r["img_size"] == 32
        assert r["ms_per_step"] > 0 and r["dtype"] == "fp32" and r["device"] == "cpu"
        assert r["peak_mem_mb"] >= 0 and r["mem_kind"].startswith("cpu_")
    text = out.read_text()
    assert "| method | trainable params | ms/step | × full | × linear | peak mem (MiB) | mem × full | mem × lora |" in text
    full_row = next(l for l in text.splitlines() if l.startswith("| full |"))
    assert "| 1.00× |" in full_row
    lora_row = next(l for l in text.splitlines() if l.startswith("| lora |"))
    ratio = by["lora"]["ms_per_step"] / by["full"]["ms_per_step"]
    assert f"{ratio:.2f}×" in lora_row and "| 2,048 |" in lora_row


def test_subprocess_worker_reports_peak_rss_delta(tmp_path):
    args = bench_step.parse_args(["--methods", "bitfit", "--out", str(tmp_path / "s.md"), *TINY])
    r = bench_step.run_one(args, "bitfit")
    assert "error" not in r, r
    assert r["method"] == "bitfit" and r["trainable_params"] > 0
    assert r["mem_kind"] in ("cpu_peak_rss_delta", "cpu_ru_maxrss_delta") and r["peak_mem_mb"] >= 0
    text = bench_step.render([r, {"method": "broken", "error": "ValueError: x"}], args)
    assert "| bitfit |" in text and "n/a" in text and "| broken | – | failed: ValueError: x |" in text


def test_unknown_method_is_a_one_line_error(tmp_path):
    from bench.registry import UnknownEntryError

    with pytest.raises(UnknownEntryError, match="unknown method 'lorra'.*Did you mean 'lora'"):
        bench_step.main(["--methods", "lorra", "--out", str(tmp_path / "x.md"), *TINY])
