"""Multi-process single runs (``bench.distributed``): batch sharding, exact evaluation merge, and two CPU
processes on gloo under torchrun giving the single-process run's numbers with exactly one record."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bench import ROOT, distributed
from bench.kinds import get as get_kind
from bench.results import load_records
from bench.run import run
from datasets.base import ImageTensorDataset, make_loader
from helpers import compose_cfg

# 49 + 32 = 81 training images (train+val) in global batches of 16: the last batch has one image, so rank
# 1's share of it is empty
FAST = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "dataset.sizes.train=49", "dataset.sizes.val=32", "dataset.sizes.test=64", "train.batch_size=16",
        "train.epochs=2", "train.lr=0.02", "train.drop_path=0", "progress=false", "device=cpu", "threads=1"]


def _dataset(n: int) -> ImageTensorDataset:
    return ImageTensorDataset(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n), [0.5] * 3, [0.5] * 3)


@pytest.mark.parametrize("n,bs,world", [(21, 8, 2), (17, 6, 3), (16, 8, 2)])
def test_rank_shards_union_is_the_single_process_batch(n, bs, world):
    ds = _dataset(n)
    single = make_loader(ds, bs, shuffle=True, seed=5)
    ranks = [make_loader(ds, bs, shuffle=True, seed=5, shard=(world, r)) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)
    for _epoch in range(2):  # the generator moves the same way every epoch (each loader runs to its end)
        epochs = [list(single)] + [list(r) for r in ranks]
        for i, (full, *parts) in enumerate(zip(*epochs)):
            n_global = distributed.global_batch_size(n, bs, i)
            assert n_global == full[1].numel()
            got = []
            for r, (_, y) in enumerate(parts):
                a, b = distributed.shard_range(n_global, world, r)
                got.append(y[: b - a])  # an empty share arrives as a one-image placeholder, skipped
                assert y.numel() == max(b - a, 1)
            assert torch.equal(torch.cat(got), full[1])


def test_shard_range_partitions():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            spans = [distributed.shard_range(n, world, r) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(spans[r][1] == spans[r + 1][0] for r in range(world - 1))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


def test_classification_shards_merge_to_the_whole_split_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7))
    ds = ImageTensorDataset(torch.randint(0, 255, (23, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 7, (23,)),
                            [0.5] * 3, [0.5] * 3)
    kind = get_kind("image_cls")
    whole = kind.evaluate(model, make_loader(ds, 5, shuffle=False), torch.device("cpu"))
    parts = [kind.evaluate(model, make_loader(ds, 5, shuffle=False, indices=range(*distributed.shard_range(23, 3, r))),
                           torch.device("cpu")) for r in range(3)]
    merged = kind.merge_eval(parts)
    assert merged["top1"] == whole["top1"] and merged["top5"] == whole["top5"] and merged["n"] == 23
    assert merged["loss"] == pytest.approx(whole["loss"], rel=1e-6)


def test_global_batch_must_divide_by_the_world_size(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before any process group
    over = FAST + [f"results.dir={tmp_path}", "train.batch_size=15"]
    with pytest.raises(ValueError, match="global batch and must divide by the 2 processes"):
        run(compose_cfg(over), over)
    assert not distributed.active() and not (tmp_path / "runs").exists()


def _torchrun(over: list[str], tmp_path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          "-m", "bench", *over, f"results.dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    files = list((tmp_path / "runs").rglob("*.json"))
    assert len(files) == 1, files  # rank 0 alone writes the record
    assert not (tmp_path / "state").exists()  # and its checkpoint folder is gone after it
    assert out.stdout.count("| record ") == 1  # one process reports
    return json.loads(files[0].read_text())


def _single(over: list[str], tmp_path) -> dict:
    [rec] = [run(compose_cfg(over + [f"results.dir={tmp_path}"]), over)]
    return rec


def _assert_same_run(one: dict, two: dict) -> None:
    assert two["perf"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert "distributed" not in one["perf"]
    assert two["config_hash"] == one["config_hash"] and two["perf"]["steps"] == one["perf"]["steps"]
    assert two["score"] == pytest.approx(one["score"], abs=1e-4)
    assert two["metrics"]["top5"] == pytest.approx(one["metrics"]["top5"], abs=1e-4)
    # every epoch's mean loss over the global batches: the same optimisation, not only the same score
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert two["trainable_params"] == one["trainable_params"]


def test_torchrun_two_gloo_processes_equal_the_single_process_run(tmp_path):
    over = FAST + ["method=lora"]
    one = _single(over, tmp_path / "one")
    two = _torchrun(over, tmp_path / "two")
    _assert_same_run(one, two)
    assert two["protocol"]["batch_size"] == 16  # the global batch


def test_torchrun_data_dependent_selection_is_made_once_and_broadcast(tmp_path):
    """GPS picks its sparse positions from gradients on the training data: rank 0 selects, rank 1 rebuilds
    the selection (the engine checks both ranks' structure fingerprints) and the run equals one process."""
    over = FAST + ["method=gps"]
    one = _single(over, tmp_path / "one")
    two = _torchrun(over, tmp_path / "two")
    _assert_same_run(one, two)
    assert two["method_info"]["selected_on"] == "rank 0, broadcast"
    assert two["method_info"]["gps_images"] == one["method_info"]["gps_images"] == 81  # train+val
