"""The runner end to end: default config, train job + record, params mode, multirun, errors."""
import json
import subprocess
import sys

import pytest
import torch

from bench import ROOT
from bench.results import load_records
from bench.run import run
from helpers import compose_cfg

TINY = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2", "train.epochs=2",
        "dataset.sizes.train=64", "dataset.sizes.val=32", "dataset.sizes.test=64", "progress=false"]


def bench_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_default_job_config_composes():
    cfg = compose_cfg()
    assert cfg.backbone.name == "vit_micro" and cfg.method.name == "lora" and cfg.dataset.name == "synthetic/dsprites_loc"
    assert cfg.mode == "train" and cfg.eval.select == "last" and cfg.device == "auto"
    for key in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs"):
        assert key in cfg.train
    assert cfg.results.dir == "results" and cfg.dataset.root is None
    assert 96 <= cfg.backbone.embed_dim <= 192 and 4 <= cfg.backbone.depth <= 6 and cfg.backbone.patch_size == 4


def test_default_backbone_is_the_shipped_pretrained_vit_micro():
    """vit_micro loads the committed FractalDB-pretrained weights by default, from any working directory."""
    from pathlib import Path

    from safetensors.torch import load_file

    from bench import ROOT
    from bench.run import build_model

    cfg = compose_cfg()
    ckpt = Path(cfg.backbone.checkpoint)
    assert ckpt.is_absolute() and ckpt == ROOT / "backbones" / "weights" / "vit_micro_fractal.safetensors"
    model, _ = build_model(compose_cfg(["method=linear"]))  # no wrappers: the backbone's own key names
    own = model.state_dict()
    saved = load_file(str(ckpt))
    assert set(own) - set(saved) == {"head.weight", "head.bias"}
    assert all(torch.equal(own[k], v.float()) for k, v in saved.items())


@pytest.mark.parametrize("select,train_split", [("last", "train800val200"), ("best_val", "train800")])
def test_train_job_writes_complete_record(tmp_path, select, train_split):
    over = TINY + [f"results.dir={tmp_path}", f"eval.select={select}", "seed=3"]
    rec = run(compose_cfg(over), over)
    [saved] = load_records(tmp_path)
    assert saved["run_id"] == rec["run_id"] and saved["status"] == "ok"
    assert 0.0 <= saved["top1"] <= 100.0 and saved["seed"] == 3
    assert saved["trainable_params"] == 2 * 2 * 2 * 32 * 8 and saved["head_params"] == 33 * 16
    assert saved["trainable_with_head"] == saved["trainable_params"] + saved["head_params"]
    p = saved["protocol"]
    assert p["select"] == select and p["train_split"] == train_split and p["eval_split"] == "test"
    assert p["image_size"] == 32 and p["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert p["optimizer"]["optimizer"] == "adamw" and not p["test_selected"]
    assert saved["perf"]["train_images_per_s"] > 0 and saved["perf"]["peak_mem_mb"] > 0
    assert saved["env"]["versions"]["torch"].startswith("2.") and "commit" in saved["env"]["git"]
    assert saved["config"]["method"]["name"] == "lora" and len(saved["history"]) == 2
    assert p["drop_path"] == 0.1 and p["label_smoothing"] == 0.0
    if select == "best_val":
        assert saved["history"][0].get("val_top1") is not None and p["select_score"] is not None


def test_params_mode_prints_json_last_line():
    out = bench_cli("mode=params", "backbone=vit_b16", "method=lora", "dataset.num_classes=100")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"method": "lora", "backbone": "vit_b16", "trainable_params": 294912, "head_params": 76900,
                      "total_params": 85_798_656 + 76_900 + 294_912}


def test_multirun_two_jobs_write_two_records(tmp_path):
    out = bench_cli("-m", "method=linear,bitfit", *TINY, "train.epochs=1", f"results.dir={tmp_path}",
                    f"hydra.sweep.dir={tmp_path}/sweep")
    assert out.returncode == 0, out.stderr[-2000:]
    recs = load_records(tmp_path)
    assert sorted(r["method"] for r in recs) == ["bitfit", "linear"]


def test_unknown_method_is_one_clear_line():
    out = bench_cli("mode=params", "method=lora,lorra")
    assert out.returncode == 2
    [line] = out.stderr.strip().splitlines()
    assert line.startswith("error: unknown method 'lorra'") and "Did you mean 'lora'?" in line and "adapter" in line
    out = bench_cli("mode=params", "dataset=synthetic/dsprites_lox")
    assert "Did you mean 'synthetic/dsprites_loc'?" in out.stderr


def test_unknown_registry_entry_is_one_line(tmp_path):
    out = bench_cli("mode=params", "method.name=lorra")
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "error: " + __import__("bench.registry", fromlist=["METHODS"]).METHODS.unknown_message("lorra"))


def test_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    tiny = [o for o in TINY if not o.startswith("backbone.checkpoint=")]
    out = bench_cli(f"backbone.checkpoint={bad}", *tiny, f"results.dir={tmp_path}")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: cannot read checkpoint")
    assert len(out.stderr.strip().splitlines()) == 1


def test_record_states_the_effective_drop_path():
    from bench.run import build_model, effective_drop_path

    model, _ = build_model(compose_cfg(["method=vpt_deep", "train.drop_path=0.2"]))
    assert effective_drop_path(model) == 0.0  # VPT-Deep switches stochastic depth off, as its official code
    model, _ = build_model(compose_cfg(["train.drop_path=0.2"]))
    assert abs(effective_drop_path(model) - 0.2) < 1e-6
