"""The formula-driven pretraining tool is reproducible and its checkpoint loads into vit_micro."""
import json

import torch
from omegaconf import OmegaConf

import backbones
from bench import CONF_DIR
from tools.pretrain_micro import main


def test_pretraining_is_reproducible_and_loadable(tmp_path):
    args = ["--classes", "3", "--per-class", "8", "--epochs", "1", "--batch", "16"]
    a = main(args + ["--out", str(tmp_path / "a.safetensors")])
    b = main(args + ["--out", str(tmp_path / "b.safetensors")])
    assert a["sha256"] == b["sha256"], "same seed and settings must give the same weights"
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["generator"]["classes"] == 3 and meta["training"]["epochs"] == 1 and 0 <= meta["heldout_top1"] <= 100
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "vit_micro.yaml")
    cfg.checkpoint = str(tmp_path / "a.safetensors")
    model = backbones.build(cfg, num_classes=5)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v.float()) for k, v in saved.items())
    assert not any(k.startswith("head.") for k in saved)


def test_committed_checkpoint_matches_its_json_and_loads():
    """The shipped FractalDB-pretrained vit_micro: sha256 as recorded, loads into the vit_micro config."""
    import hashlib

    import pytest

    from tools.pretrain_micro import OUT

    if not OUT.is_file():
        pytest.skip("no pretrained vit_micro committed yet")
    meta = json.loads(OUT.with_suffix(".json").read_text())
    assert hashlib.sha256(OUT.read_bytes()).hexdigest() == meta["sha256"]
    assert meta["generator"]["classes"] >= 100 and meta["heldout_top1"] > 10.0  # far above 1 % chance
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "vit_micro.yaml")
    cfg.checkpoint = str(OUT)
    model = backbones.build(cfg, num_classes=16)
    from safetensors.torch import load_file

    saved = load_file(str(OUT))
    own = model.state_dict()
    assert len(saved) == len(own) - 2 and all(torch.equal(own[k], v.float()) for k, v in saved.items())


def _swin_cfg(checkpoint):
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "swin_micro.yaml")
    cfg.checkpoint = str(checkpoint)
    return cfg


def _assert_swin_loads(path):
    """A timm-layout swin_micro file: the image Swin takes every tensor; the dense Swin-Det every tensor but the
    classification ``norm.*`` (its per-stage norm0/norm1 are new, identity)."""
    from safetensors.torch import load_file

    from backbones.swin_det import build_swin_det

    saved = load_file(str(path))
    assert not any(k.startswith("head.") for k in saved) and "norm.weight" in saved
    own = backbones.build(_swin_cfg(path), num_classes=7).state_dict()
    assert all(torch.equal(own[k], v.float()) for k, v in saved.items())
    det = build_swin_det(_swin_cfg(path), out_indices=[0, 1]).state_dict()
    body = {k: v for k, v in saved.items() if not k.startswith("norm.")}
    assert body and all(torch.equal(det[k], v.float()) for k, v in body.items())
    assert torch.equal(det["norm0.weight"], torch.ones(16)) and torch.equal(det["norm1.bias"], torch.zeros(32))
    return saved


def test_swin_micro_pretraining_is_reproducible_and_loads_dense_and_image(tmp_path):
    args = ["--backbone", "swin_micro", "--colour", "--classes", "3", "--per-class", "8", "--epochs", "1",
            "--batch", "16"]
    a = main(args + ["--out", str(tmp_path / "a.safetensors")])
    b = main(args + ["--out", str(tmp_path / "b.safetensors")])
    assert a["sha256"] == b["sha256"] and a["backbone"] == "swin_micro"
    assert a["training"]["steps"] == 2 and "random colours" in a["training"]["augment"]
    _assert_swin_loads(tmp_path / "a.safetensors")


def test_swin_micro_seg_pretext_is_reproducible_and_loads_dense_and_image(tmp_path):
    """--task seg: per-pixel fractal classes through Swin-Det; the file has the classification layout (the
    last stage's trained output norm as ``norm.*``), so both Swins load it."""
    args = ["--backbone", "swin_micro", "--task", "seg", "--scenes", "40", "--classes", "3", "--per-class", "4",
            "--epochs", "1", "--batch", "16"]
    a = main(args + ["--out", str(tmp_path / "a.safetensors")])
    b = main(args + ["--out", str(tmp_path / "b.safetensors")])
    assert a["sha256"] == b["sha256"] and a["task"] == "seg"
    assert a["training"]["steps"] == 3  # 36 training scenes (4 held out) in batches of 16
    assert a["generator"]["scenes"] == 40 and 0 <= a["heldout_miou"] <= 100 and 0 <= a["heldout_fg_miou"] <= 100
    saved = _assert_swin_loads(tmp_path / "a.safetensors")
    assert not any(k.startswith(("norm0", "norm1")) for k in saved)


def test_seg_pretext_is_only_for_the_swin():
    import pytest

    with pytest.raises(SystemExit):
        main(["--task", "seg", "--backbone", "vit_micro"])


def test_committed_swin_micro_checkpoint_is_the_default_and_matches_its_json():
    import hashlib

    from tools.pretrain_micro import default_out

    path = default_out("swin_micro")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"] and meta["backbone"] == "swin_micro"
    # the dense pretext (README "Dense prediction": classification pretraining did not transfer to the dense tasks)
    assert meta["task"] == "seg" and meta["generator"]["classes"] >= 32 and meta["generator"]["scenes"] >= 4000
    assert meta["heldout_fg_miou"] > 50.0  # fractal vs background; predicting background everywhere gives ~36
    assert path.stat().st_size < 300_000
    from tests.helpers import compose_cfg

    assert compose_cfg(["backbone=swin_micro"]).backbone.checkpoint == str(path)  # the yaml's default
    _assert_swin_loads(path)
