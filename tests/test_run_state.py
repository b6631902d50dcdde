"""Config hash and run state folder (bench/state.py)."""
from omegaconf import OmegaConf

from bench import ROOT
from bench.state import RunState, config_hash
from helpers import compose_cfg


def _resolved(over):
    return OmegaConf.to_container(compose_cfg(over), resolve=True)


def test_config_hash_ignores_non_result_keys_only():
    base = config_hash(_resolved([]))
    assert base == config_hash(_resolved([]))
    for o in ("progress=false", "device=cpu", "threads=1", "results.dir=/elsewhere", "resume=never",
              "skip_done=true", "logger=wandb", "cache_dir=/tmp/c"):
        assert config_hash(_resolved([o])) == base, o
    for o in ("train.lr=0.01", "seed=1", "method.rank=4", "dataset.sizes.train=64", "eval.select=best_val"):
        assert config_hash(_resolved([o])) != base, o


def test_config_hash_does_not_depend_on_the_checkout_folder():
    r = _resolved([])
    assert r["backbone"]["checkpoint"].startswith(str(ROOT))
    moved = {**r, "backbone": {**r["backbone"], "checkpoint": "/other/clone/" + r["backbone"]["checkpoint"][len(str(ROOT)) + 1:]}}
    assert config_hash(moved) != config_hash(r)  # outside the suite: a different file
    assert "<suite>/backbones/weights/" in __import__("json").dumps(__import__("bench.state", fromlist=["x"]).hash_material(r))


def test_second_holder_of_a_config_gets_a_private_folder(tmp_path):
    a = RunState(tmp_path, "abc", "run1")
    b = RunState(tmp_path, "abc", "run2")
    assert a.shared and a.dir == tmp_path / "state" / "abc"
    assert not b.shared and not b.resume_enabled and b.dir == tmp_path / "state" / "abc.run2"
    a.save({"x": 1})
    assert a.load()["x"] == 1 and b.load() is None
    assert not list(a.dir.glob(".*.tmp"))
    b.release(remove=True)
    a.release(remove=True)
    assert not (tmp_path / "state").exists()
    c = RunState(tmp_path, "abc", "run3")  # the lock is free again
    assert c.shared
    c.release(remove=True)


TINY = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "train.epochs=2", "train.batch_size=32", "dataset.sizes.train=64", "dataset.sizes.val=32",
        "dataset.sizes.test=64", "progress=false", "device=cpu"]


def test_resume_of_a_data_dependent_method_under_best_val(tmp_path, monkeypatch):
    """SPT (prepare re-runs from its cached sensitivity; the structure fingerprint matches) with
    eval.select=best_val (the best epoch's tensors are in the checkpoint): interrupted after epoch 1,
    resumed, same result as uninterrupted."""
    import pytest

    from bench import state as run_state
    from bench.results import load_records
    from bench.run import run

    over = TINY + ["method=spt_lora", "method.budget=5k", "eval.select=best_val"]
    ref = run(compose_cfg(over + [f"results.dir={tmp_path / 'ref'}"]), over)

    saves = {"n": 0}
    real_save = run_state.RunState.save

    def save_then_die(self, ck):
        path = real_save(self, ck)
        saves["n"] += 1
        raise KeyboardInterrupt  # as if killed right after the first epoch's checkpoint

    monkeypatch.setattr(run_state.RunState, "save", save_then_die)
    cut = over + [f"results.dir={tmp_path / 'cut'}"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_cfg(cut), cut)
    assert saves["n"] == 1 and list((tmp_path / "cut" / "state").glob("*/last.pt"))
    monkeypatch.setattr(run_state.RunState, "save", real_save)
    rec = run(compose_cfg(cut), cut)
    assert rec["resumed"]["from_epoch"] == 1 and rec["method_info"]["resume_prepare"]["sensitivity"] == "loaded"
    assert rec["score"] == ref["score"] and rec["protocol"]["selected_epoch"] == ref["protocol"]["selected_epoch"]
    assert [h["train_loss"] for h in rec["history"]] == [h["train_loss"] for h in ref["history"]]
    assert len(load_records(tmp_path / "cut")) == 1
