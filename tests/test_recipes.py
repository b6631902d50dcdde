"""Recipes: per (method, dataset) hyper-parameter files, picked automatically, overridable."""
from pathlib import Path

from omegaconf import OmegaConf

from bench import CONF_DIR
from helpers import compose_cfg


def test_recipe_is_selected_from_method_and_dataset():
    cfg = compose_cfg()
    assert cfg.recipe.source.startswith("petl-bench default job")
    assert cfg.train.epochs == 10 and cfg.train.lr == 5e-3


def test_command_line_beats_recipe():
    cfg = compose_cfg(["train.lr=0.123"])
    assert cfg.train.lr == 0.123 and cfg.recipe is not None


def test_missing_recipe_falls_back_to_defaults():
    cfg = compose_cfg(["method=linear"])
    assert cfg.recipe is None


def test_every_recipe_file_names_an_existing_method_and_dataset():
    root = Path(CONF_DIR) / "recipe"
    for p in root.rglob("*.yaml"):
        method, dataset = p.relative_to(root).with_suffix("").as_posix().split("/", 1)
        assert (Path(CONF_DIR) / "method" / f"{method}.yaml").is_file(), p
        assert (Path(CONF_DIR) / "dataset" / f"{dataset}.yaml").is_file(), p
        rec = OmegaConf.load(p)
        assert "recipe" in rec and rec.recipe.source, f"{p}: recipe.source (where the numbers come from) is required"
