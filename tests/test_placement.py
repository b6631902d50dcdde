"""bench/placement.py: the device data path gives the DataLoader path's batches; channels_last; compile."""
import pytest
import torch
from omegaconf import OmegaConf

from bench import placement
from bench.results import load_records
from bench.run import run
from datasets.base import ImageTensorDataset, make_loader
from datasets.images import PILAugmentDataset, RaggedCropDataset
from helpers import compose_cfg

ON = OmegaConf.create({"data_on_device": True})
CPU = torch.device("cpu")
TINY = ["backbone.checkpoint=null", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
        "train.epochs=2", "train.batch_size=24", "dataset.sizes.train=48", "dataset.sizes.val=16",
        "dataset.sizes.test=16", "progress=false"]


def _images(n=50, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _same(a_batches, b_batches):
    a_batches, b_batches = list(a_batches), list(b_batches)
    assert len(a_batches) == len(b_batches)
    for (xa, ya), (xb, yb) in zip(a_batches, b_batches):
        assert xa.dtype == xb.dtype == torch.float32
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_path_yields_the_dataloader_batches_and_normalisation():
    ds = ImageTensorDataset(_images(), torch.arange(50) % 7, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25])
    dev, info = placement.train_loader(ds, 16, 3, CPU, ON)
    ref = make_loader(ds, 16, shuffle=True, seed=3)
    assert info["data_on_device"] and isinstance(dev, placement.DeviceBatches) and len(dev) == len(ref) == 4
    for _ in range(2):  # same seeded order in every epoch, last partial batch included
        _same(dev, ref)
    assert torch.equal(dev.generator.get_state(), ref.generator.get_state())  # resume restores the same way
    # normalisation equals torchvision's ToTensor + Normalize exactly (labels = indices give the order)
    from torchvision.transforms import functional as TF

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]
    ds = ImageTensorDataset(_images(), torch.arange(50), mean, std)
    x, idx = next(iter(placement.train_loader(ds, 50, 0, CPU, ON)[0]))
    assert sorted(idx.tolist()) == list(range(50))
    assert torch.equal(x, TF.normalize(ds.images[idx].float() / 255.0, mean, std))


def test_tensor_augment_runs_on_the_device_path():
    def flip_all(x):
        return x.flip(-1)

    ds = ImageTensorDataset(_images(20), torch.arange(20), [0.5] * 3, [0.5] * 3, augment=flip_all)
    _same(placement.train_loader(ds, 8, 1, CPU, ON)[0], make_loader(ds, 8, shuffle=True, seed=1))


def test_ragged_crop_flip_matches_the_cpu_path():
    g = torch.Generator().manual_seed(1)
    data, index, off = [], [], 0
    for h, w in [(10, 12), (9, 9), (14, 10), (8, 11)] * 5:
        t = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        data.append(t.flatten())
        index.append((off, h, w))
        off += t.numel()
    ds = RaggedCropDataset(torch.cat(data), torch.tensor(index), torch.arange(20) % 3, 8, [0.4] * 3, [0.3] * 3)
    dev, info = placement.train_loader(ds, 6, 1, CPU, ON)
    assert info["data_on_device"] and info["dataset"] == "RaggedCropDataset"
    torch.manual_seed(5)
    a = list(dev)
    torch.manual_seed(5)  # the same global-RNG draws: identical crops and flips
    _same(a, make_loader(ds, 6, shuffle=True, seed=1))


def test_fallbacks_keep_the_dataloader_and_say_why():
    imgs, y = _images(10), torch.arange(10)
    pil = PILAugmentDataset(imgs, y, [0.5] * 3, [0.5] * 3, pil_transform=lambda im: im)
    loader, info = placement.train_loader(pil, 4, 0, CPU, ON)
    assert isinstance(loader, torch.utils.data.DataLoader) and "PIL" in info["reason"]
    plain = PILAugmentDataset(imgs, y, [0.5] * 3, [0.5] * 3, None)
    assert placement.train_loader(plain, 4, 0, CPU, ON)[1]["data_on_device"]  # VTAB-1k without train_aug
    auto = OmegaConf.create({"data_on_device": "auto"})
    assert placement.train_loader(plain, 4, 0, CPU, auto)[1]["reason"] == "auto: off on cpu"
    assert "video_cls" in placement.train_loader(plain, 4, 0, CPU, ON, kind="video_cls")[1]["reason"]
    with pytest.raises(ValueError, match="train.data_on_device=maybe"):
        placement.train_loader(plain, 4, 0, CPU, OmegaConf.create({"data_on_device": "maybe"}))


def _run(tmp_path, *extra):
    over = TINY + [f"results.dir={tmp_path}", *extra]
    run(compose_cfg(over), over)
    [rec] = load_records(tmp_path)
    return rec


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A run with the default placement (on CPU: auto = the DataLoader path), for comparison."""
    return _run(tmp_path_factory.mktemp("default"))


def test_training_on_the_device_path_equals_the_dataloader_run(tmp_path, default_run):
    on = _run(tmp_path / "on", "train.data_on_device=true")
    off = default_run
    assert on["status"] == "ok" and on["perf"]["placement"]["data_on_device"] is True
    assert off["perf"]["placement"]["data_on_device"] is False
    assert [h["train_loss"] for h in on["history"]] == [h["train_loss"] for h in off["history"]]
    assert on["score"] == off["score"] and on["config_hash"] == off["config_hash"]  # a speed switch only


def test_channels_last_gives_the_same_loss(tmp_path, default_run):
    cl = _run(tmp_path / "cl", "train.channels_last=true")
    ref = default_run
    assert cl["perf"]["placement"]["channels_last"] is True
    for a, b in zip(cl["history"], ref["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-5)


def test_compile_falls_back_to_eager_when_it_fails(tmp_path):
    rec = _run(tmp_path, "train.compile=no_such_backend")
    p = rec["perf"]["placement"]
    assert rec["status"] == "ok" and p["compile"] == "no_such_backend" and "at setup" in p["compile_fallback"]


def test_compile_forward_first_call_failure_and_success():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    x = torch.randn(2, 4)
    want = model(x)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    info: dict = {}
    placement.compile_forward(model, broken_backend, info)
    assert torch.equal(model(x), want) and "first forward" in info["compile_fallback"]
    assert torch.equal(model(x), want)  # stays eager
    ok = torch.nn.Sequential(torch.nn.Linear(4, 3))
    info = {}
    placement.compile_forward(ok, "eager", info)  # dynamo tracing only: no C++ compiler needed
    assert torch.allclose(ok(x), ok[0](x)) and "compile_fallback" not in info
