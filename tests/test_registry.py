from pathlib import Path

import pytest

from bench import CONF_DIR
from bench.registry import BACKBONES, DATASETS, METHODS, Registry, UnknownEntryError


def test_unknown_name_lists_known_and_closest():
    r = Registry("method", "method")
    r.add("lora", object())
    r.add("adapter", object())
    with pytest.raises(UnknownEntryError) as e:
        r.get("lorra")
    msg = str(e.value)
    assert "unknown method 'lorra'" in msg and "Did you mean 'lora'?" in msg and "Known: adapter, lora" in msg
    assert "\n" not in msg


def test_duplicate_registration_fails():
    r = Registry("x", "x")
    r.add("a", 1)
    with pytest.raises(ValueError):
        r.add("a", 2)


@pytest.mark.parametrize("registry,group", [(METHODS, "method"), (DATASETS, "dataset"), (BACKBONES, "backbone")])
def test_every_yaml_names_a_registered_entry_and_vice_versa(registry, group):
    from omegaconf import OmegaConf

    root = Path(CONF_DIR) / group
    yamls = {}
    for p in root.rglob("*.yaml"):
        rel = p.relative_to(root).with_suffix("").as_posix()
        cfg = OmegaConf.load(p)
        if "name" not in cfg:  # helper data files (e.g. per-dataset tables) are not entries
            continue
        assert cfg.name == rel, f"{p}: name '{cfg.name}' must equal the file name '{rel}'"
        yamls[rel] = p
    assert set(yamls) == set(registry.names())


def test_group_globs_expand_over_nested_configs():
    """dataset=glob(synthetic/*) sweeps the procedural tasks (Hydra's glob sees no nested options)."""
    from bench.cli import expand_group_globs

    out = expand_group_globs(["-m", "dataset=glob(synthetic/*)", "method=glob(spt_*)", "seed=0,1", "train.lr=glob(x)"])
    assert out == ["-m", "dataset=synthetic/clevr_count,synthetic/dsprites_loc,synthetic/dsprites_ori,synthetic/moving_dsprites,"
                   "synthetic/shapes_det,synthetic/shapes_seg,synthetic/textures",
                   "method=spt_adapter,spt_lora", "seed=0,1", "train.lr=glob(x)"]
    vtab = expand_group_globs(["dataset=glob(vtab/*,exclude=[vtab/s*,vtab/d*])"])[0].split("=")[1].split(",")
    assert len(vtab) == 19 - 9 and "vtab/cifar100" in vtab and not any(n.startswith(("vtab/s", "vtab/d")) for n in vtab)
    with pytest.raises(SystemExit, match="matches no config in conf/method/"):
        expand_group_globs(["method=glob(nope*)"])
