"""Generated recipes (tools/make_recipes.py): committed files = generator output, values as transcribed."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bench import CONF_DIR
from tools import make_recipes as mr

ALL_RECIPES = mr.all_recipes()
RECIPES = {k: v for k, v in ALL_RECIPES.items() if k[1] not in mr.VIDEO_SETS + mr.DENSE_SETS}  # image recipes
DENSE = {k: v for k, v in ALL_RECIPES.items() if k[1] in mr.DENSE_SETS}
VIDEO = {k: v for k, v in ALL_RECIPES.items() if k[1] in mr.VIDEO_SETS}
# the methods of the suite (existing and being written); recipes may only name these
METHODS = set("""full linear bitfit lora adapter vpt_shallow ln_tune partial vpt_deep prefix u_tuning adaptformer dora
vera fourierft ssf fact_tt fact_tk repadapter convpass hydra_adapter dtl noah spt_lora spt_adapter gps sct snell arc
arc_att lst hst last snf bapat patt e2vpt glora vqt dyt mona adapter_plus pissa svft lorand e3va""".split())


def _train(method, ds):
    return RECIPES[method, ds]["train"]


def test_committed_files_equal_generator_output(tmp_path):
    out = tmp_path / "recipe"
    n, removed = mr.write(out)
    assert n == len(ALL_RECIPES) == 584 + 16 + 2 * 19 + 24 + 33 and removed == 0  # + video, glora/dyt, adapter_plus, dense
    committed = {p.relative_to(mr.RECIPE_DIR).as_posix(): p.read_text(encoding="utf-8")
                 for p in mr.RECIPE_DIR.rglob("*.yaml") if mr.is_generated(p)}
    generated = {p.relative_to(out).as_posix(): p.read_text(encoding="utf-8") for p in out.rglob("*.yaml")}
    assert committed.keys() == generated.keys(), "run `python -m tools.make_recipes`"
    assert [k for k in committed if committed[k] != generated[k]] == [], "run `python -m tools.make_recipes`"
    assert mr.check(mr.RECIPE_DIR) == []
    # deterministic, and hand-written recipes are left alone while stale generated ones go
    (out / "lora" / "synthetic").mkdir(parents=True)
    (out / "lora" / "synthetic" / "mine.yaml").write_text("# @package _global_\nrecipe: {source: me}\n")
    (out / "ssf" / "vtab" / "gone.yaml").write_text("# @package _global_\n" + mr.MARKER + "\n")
    assert mr.write(out) == (584 + 16 + 2 * 19 + 24 + 33, 1)
    assert (out / "lora" / "synthetic" / "mine.yaml").is_file() and not (out / "ssf" / "vtab" / "gone.yaml").exists()
    assert {p.relative_to(out).as_posix(): p.read_text() for p in out.rglob("*.yaml") if mr.is_generated(p)} == generated
    assert mr.main(["--check", "--out", str(out)]) == 0
    (out / "ssf" / "vtab" / "dtd.yaml").write_text("# @package _global_\n" + mr.MARKER + "\nchanged\n")
    assert mr.check(out) == ["ssf/vtab/dtd.yaml"]


def test_every_recipe_is_complete_and_names_known_things():
    base = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    assert set(mr.TRAIN_KEYS) <= set(base.train.keys())
    for (method, ds), rec in RECIPES.items():
        assert method in METHODS and ds in mr.DATASET_CONFIG, (method, ds)
        assert rec["source"] and list(rec["train"]) == mr.TRAIN_KEYS, (method, ds)
        t = rec["train"]
        assert t["optimizer"] in ("adamw", "sgd") and 0 < t["lr"] <= 15 and 0 <= t["weight_decay"] <= 1
        assert t["epochs"] in (100, 200) + ((500,) if method == "glora" else ()) and t["warmup_epochs"] == 10 and t["batch_size"] in (8, 16, 32, 64, 128)
        assert 0 <= t["min_lr"] <= 1e-5 and 0 <= t["warmup_lr"] <= 1e-4 and 0 <= t["drop_path"] <= 0.2
        assert t["label_smoothing"] in (0.0, 0.1) and t["clip_grad"] in (None, 1.0)
        # train_aug is a VTAB key of the datasets; FGVC recipes never set it
        assert set(rec["dataset"]) == ({"train_aug"} if ds in mr.VTAB_TASKS else set()), (method, ds)
    assert not {m for m, _ in RECIPES} & set(mr.NO_RECIPE)


def test_every_file_loads_with_the_global_package_and_known_keys():
    base = OmegaConf.load(Path(CONF_DIR) / "config.yaml")
    for rel, text in mr.recipe_files().items():
        lines = text.splitlines()
        assert lines[0] == "# @package _global_" and lines[1].startswith(mr.MARKER), rel
        cfg = OmegaConf.create(text)
        assert set(cfg.keys()) <= {"recipe", "train", "dataset"}, rel
        if rel.split("/")[1] == "video":  # the loop is picked by the backbone family
            cfg = OmegaConf.merge(cfg, {"backbone": {"family": "video_swin"}})
        assert set(cfg.train.keys()) <= set(base.train.keys()), rel
        for k in ("lr", "weight_decay", "min_lr", "warmup_lr", "drop_path", "label_smoothing"):
            assert isinstance(cfg.train[k], float), (rel, k)
        assert rel.split("/", 1)[0] in METHODS, rel


@pytest.mark.parametrize("method,ds,expect", [
    # V-PETL shared table and the per-method exceptions (specs/vpetl_image.md sec. 7)
    ("adapter", "cifar100", dict(lr=0.01, weight_decay=1.0, batch_size=64, label_smoothing=0.1, no_decay_1d=False)),
    ("lora", "cifar100", dict(lr=0.005, weight_decay=0.005)),
    ("bitfit", "caltech101", dict(lr=0.006, weight_decay=0.25)),
    ("ln_tune", "cifar100", dict(lr=0.008, weight_decay=0.01)),
    ("vpt_shallow", "smallnorb_ele", dict(lr=0.0011, weight_decay=0.0005, label_smoothing=0.0)),
    ("adaptformer", "eurosat", dict(lr=0.06, weight_decay=0.001, warmup_lr=1e-6, min_lr=1e-5, drop_path=0.1)),
    ("linear", "nabirds", dict(lr=2e-4, weight_decay=0.05, batch_size=128, label_smoothing=0.0)),
    ("sct", "oxford_flowers102", dict(lr=0.085, weight_decay=0.07, batch_size=32)),
    ("full", "cifar100", dict(lr=5e-4, weight_decay=0.1, warmup_lr=1e-4, min_lr=1e-6)),
    # SPT, SNELL, ARC (specs/spt_snell_arc.md sec. 1.3, 2.2, 3.3)
    ("spt_lora", "dmlab", dict(lr=1e-3, weight_decay=1e-4, no_decay_1d=True, batch_size=64, label_smoothing=0.0)),
    ("snell", "patch_camelyon", dict(lr=7e-4, weight_decay=0.05, batch_size=16, epochs=100)),
    ("snell", "cifar100", dict(lr=1e-3, weight_decay=0.01, batch_size=16, epochs=200)),
    ("snell", "dogs", dict(lr=3e-4, weight_decay=5e-3, batch_size=32)),
    ("arc", "kitti", dict(lr=1e-2, weight_decay=0.0, batch_size=32, clip_grad=1.0, warmup_lr=0.0, min_lr=1e-8)),
    ("arc_att", "flowers", dict(lr=2.5e-3, weight_decay=0.01, min_lr=2.5e-9)),
    # other official repos
    ("ssf", "clevr_dist", dict(lr=5e-2, weight_decay=5e-2, drop_path=0.1, batch_size=64, min_lr=1e-8, warmup_lr=1e-7)),
    ("ssf", "cub", dict(lr=1e-2, weight_decay=5e-2, label_smoothing=0.1)),
    ("hst", "cars", dict(lr=5e-3, batch_size=128)),
    ("gps", "dogs", dict(lr=1e-4, batch_size=64, weight_decay=0.0)),
    ("dtl", "dsprites_loc", dict(lr=1e-2, drop_path=0.0, weight_decay=0.05, batch_size=32)),
    ("hydra_adapter", "smallnorb_azi", dict(lr=5e-3, weight_decay=1e-5, batch_size=64)),
    ("noah", "svhn", dict(lr=1e-3, weight_decay=1e-4, no_decay_1d=True)),
    ("fact_tk", "svhn", dict(lr=1e-3, weight_decay=1e-4, no_decay_1d=False)),
    ("vpt_deep", "sun397", dict(optimizer="sgd", lr=12.5, weight_decay=1e-4, batch_size=128, drop_path=0.0)),
    ("vpt_deep", "cub", dict(optimizer="sgd", lr=0.1, weight_decay=0.01, batch_size=128)),
    # Adapter+ (one recipe for every dataset: conf/train + conf/data of visinf/adapter_plus)
    ("adapter_plus", "kitti", dict(lr=1e-3, weight_decay=1e-4, no_decay_1d=True, batch_size=64, warmup_lr=1e-5,
                                   min_lr=1e-6, drop_path=0.1, label_smoothing=0.0)),
    ("adapter_plus", "cars", dict(lr=1e-3, weight_decay=1e-4, batch_size=64, epochs=100)),
    # explicit fallback
    ("dora", "cifar100", dict(lr=0.005, weight_decay=0.005)),
])
def test_transcribed_values(method, ds, expect):
    t = _train(method, ds)
    assert {k: t[k] for k in expect} == expect


def test_coverage_and_documented_gaps():
    per_method = {}
    for m, ds in RECIPES:
        per_method.setdefault(m, set()).add(ds)
    vtab, fgvc = set(mr.VTAB_TASKS), set(mr.FGVC_SETS)
    for m in ("linear", "bitfit", "ln_tune", "vpt_shallow", "adapter", "adaptformer", "lora", "snell", "arc", "arc_att",
              "ssf", "hst", "gps", "dora", "vera", "fourierft", "adapter_plus"):
        assert per_method[m] == vtab | fgvc, m
    for m in ("sct", "spt_lora", "spt_adapter", "dtl", "hydra_adapter", "noah", "fact_tt", "fact_tk", "convpass",
              "repadapter", "glora", "dyt"):
        assert per_method[m] == vtab, m
    assert per_method["full"] == {"cifar100", "caltech101"}           # dtd = sweep, the rest train the Adapter
    assert per_method["vpt_deep"] == {"dmlab", "eurosat", "sun397"} | fgvc
    assert set(mr.NO_RECIPE) == {"partial", "prefix", "u_tuning", "lst", "snf", "last", "e2vpt", "vqt", "mona",
                                 "pissa", "svft"}
    assert METHODS - {"bapat", "patt", "lorand", "e3va"} == set(per_method) | set(mr.NO_RECIPE)
    for ds in vtab | fgvc:
        assert RECIPES["dora", ds]["source"].startswith("FALLBACK")
        assert RECIPES["dora", ds]["train"] == RECIPES["lora", ds]["train"]
    # train_aug: V-PETL's per-task value; SCT's own list; off for the NOAH/SPT/SNELL-style pipelines
    aug = {t for t in vtab if RECIPES["adapter", t]["dataset"]["train_aug"]}
    assert aug == {"dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397", "patch_camelyon", "eurosat",
                   "resisc45", "diabetic_retinopathy", "clevr_count", "dmlab", "kitti"}
    sct = {t for t in vtab if RECIPES["sct", t]["dataset"]["train_aug"]}
    assert sct == aug - {"oxford_flowers102", "sun397"} | {"clevr_dist"}
    assert not any(RECIPES[m, t]["dataset"]["train_aug"] for m in ("spt_lora", "snell", "noah", "ssf") for t in vtab)


def test_dataset_names_live_in_one_table():
    assert mr.DATASET_CONFIG["cub"] == "fgvc/cub" and mr.DATASET_CONFIG["cifar100"] == "vtab/cifar100"
    assert set(mr.recipe_files()) == {f"{m}/{mr.DATASET_CONFIG[d]}.yaml" for m, d in ALL_RECIPES}


def test_bad_train_keys_are_one_line_errors():
    with pytest.raises(ValueError, match=r"missing \['clip_grad'\], unknown \['lrr'\]"):
        mr._train(**{**{k: 0 for k in mr.TRAIN_KEYS if k != "clip_grad"}, "lrr": 1})


def test_hydra_composes_a_generated_recipe_and_the_command_line_wins(tmp_path):
    """Compose with a copy of conf/ (a stub vtab/cifar100 dataset is added if the datasets are not merged yet)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    ds = conf / "dataset" / "vtab" / "cifar100.yaml"
    if not ds.is_file():
        ds.parent.mkdir(parents=True, exist_ok=True)
        ds.write_text("name: vtab/cifar100\nbenchmark: vtab\nnum_classes: 100\ntrain_aug: true\n")
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=adapter", "dataset=vtab/cifar100"])
        assert cfg.recipe.source.startswith("synbol/Parameter-Efficient-Transfer-Learning-Benchmark@c188fad")
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.label_smoothing) == (0.01, 1.0, 0.1)
        assert cfg.dataset.train_aug is False and cfg.train.clip_grad is None and cfg.train.epochs == 100
        cfg = compose(config_name="config", overrides=["method=adapter", "dataset=vtab/cifar100", "train.lr=0.5",
                                                       "dataset.train_aug=true"])
        assert cfg.train.lr == 0.5 and cfg.dataset.train_aug is True and cfg.train.weight_decay == 1.0


@pytest.mark.parametrize("family,expect", [
    ("video_swin", dict(optimizer="sgd", lr=0.00625, batch_size=16, epochs=70, warmup_epochs=10, weight_decay=0.0,
                        drop_path=0.4, warmup_lr=0.0, min_lr=0.0)),
    ("video_vit", dict(optimizer="sgd", lr=0.4, batch_size=1024, epochs=90, warmup_epochs=10, drop_path=0.0)),
])
def test_video_recipes_follow_the_backbone_family(family, expect):
    """Spec video_dense.md D-20: one loop per backbone family, the same for every video method."""
    assert {m for m, _ in VIDEO} == set(mr.VIDEO_METHODS) and {d for _, d in VIDEO} == {"ssv2", "hmdb51"}
    for rel, text in mr.recipe_files().items():
        if rel.split("/")[1] != "video":
            continue
        cfg = OmegaConf.merge(OmegaConf.create(text), {"backbone": {"family": family}})
        t = OmegaConf.to_container(cfg.train, resolve=True)
        assert {k: t[k] for k in expect} == expect, rel
        assert cfg.dataset.eval_views.spatial == (1 if family == "video_swin" else 3), rel


def test_dense_recipes_are_the_mona_configs():
    """Spec video_dense.md D-21/D-22: one loop per dense task, the same for every method (Mona on ADE20K: lr x5,
    drop path 0.2); the mmdet/mmseg weight-decay exemptions by name."""
    assert {m for m, _ in DENSE} == set(mr.DENSE_METHODS) and len(DENSE) == 11 * 3
    coco, voc, ade = (DENSE["lora", d] for d in ("coco", "voc", "ade20k"))
    assert {k: coco["train"][k] for k in ("epochs", "batch_size", "lr", "weight_decay", "drop_path", "warmup_lr")} == \
        dict(epochs=36, batch_size=16, lr=1e-4, weight_decay=0.05, drop_path=0.3, warmup_lr=1e-7)
    assert coco["train_extra"] == dict(schedule="step", milestones=[27, 33], warmup_steps=500,
                                       no_decay_keys=["absolute_pos_embed", "relative_position_bias_table", "norm"])
    assert (voc["train"]["epochs"], voc["train"]["batch_size"], voc["train"]["drop_path"]) == (4, 2, 0.2)
    assert voc["train_extra"]["milestones"] == [3] and voc["train_extra"]["warmup_steps"] == 0
    assert (ade["train"]["lr"], ade["train"]["weight_decay"], ade["train"]["drop_path"]) == (6e-5, 0.01, 0.3)
    assert ade["train_extra"]["max_steps"] == 160000 and ade["train_extra"]["schedule"] == "poly"
    mona = DENSE["mona", "ade20k"]["train"]
    assert (mona["lr"], mona["drop_path"]) == (3e-4, 0.2) and DENSE["mona", "coco"]["train"] == coco["train"]
    for (m, d), rec in DENSE.items():
        if (m, d) != ("mona", "ade20k"):
            assert rec["train"] == DENSE["lora", d]["train"], (m, d)


def test_dense_recipe_composes_with_the_schedule_and_no_decay_groups():
    import torch
    from bench.optim import build_optimizer, build_scheduler, default_param_groups

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["method=lora", "dataset=dense/coco", "backbone=swin_b"])
    t = cfg.train
    assert (t.schedule, list(t.milestones), t.warmup_steps, t.lr) == ("step", [27, 33], 500, 1e-4)
    model = torch.nn.Module()
    model.layers = torch.nn.Linear(4, 4)
    model.norm1 = torch.nn.LayerNorm(4)
    model.relative_position_bias_table = torch.nn.Parameter(torch.zeros(9, 2))
    groups = default_param_groups(model, 0.05, False, list(t.no_decay_keys))
    assert [len(g["params"]) for g in groups] == [2, 3] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    opt = build_optimizer(groups, t)
    sched = build_scheduler(opt, t, steps_per_epoch=1000)
    lrs = []
    for step in (0, 250, 500, 26_999, 27_000, 33_000):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-7) and lrs[2] == pytest.approx(1e-4) and lrs[1] == pytest.approx((1e-7 + 1e-4) / 2)
    assert lrs[3] == pytest.approx(1e-4) and lrs[4] == pytest.approx(1e-5) and lrs[5] == pytest.approx(1e-6)
