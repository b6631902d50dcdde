"""The method contract on the tiny Swin, ConvNeXt and video backbones for every method defined on them."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import backbones
from bench import CONF_DIR
from bench.registry import METHODS
from datasets.base import make_loader
from helpers import TINY_VIDEO_SWIN, TINY_VIDEO_VIT, build, clips
from helpers import images as image_batch
from test_method_contract import tiny_loader, train_step

TINY = {f: OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / f"{f}_micro.yaml"))
        for f in ("swin", "convnext")}
TINY.update(video_vit=TINY_VIDEO_VIT, video_swin=TINY_VIDEO_SWIN)
VIDEO = ("video_vit", "video_swin")
CASES = [(n, f) for n in METHODS.names() for f in TINY if f in METHODS.get(n).families
         and not getattr(METHODS.get(n), "dense_only", False)]  # dense-only methods: tests/test_dense.py


def images(n, seed=0, family="swin"):
    return clips(n, seed=seed) if family in VIDEO else image_batch(n, seed=seed)


class ClipSet(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitems__(self, idx):
        return clips(len(idx), seed=idx[0]), torch.as_tensor(idx) % 10


def ready(name, family, **over):
    model, m = build(name, backbone=TINY[family], **over)
    if m.needs_prepare:
        loader = make_loader(ClipSet(), 8, shuffle=False) if family in VIDEO else tiny_loader()
        m.prepare(model, loader, torch.nn.CrossEntropyLoss())
    return model, m


def plain(family):
    torch.manual_seed(0)
    return backbones.build(OmegaConf.create(TINY[family]), num_classes=10)


@pytest.mark.parametrize("name,family", CASES)
def test_step_gradients_and_frozen_tensors(name, family):
    model, m = ready(name, family)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    y = torch.arange(8) % 10
    train_step(model, m, images(8, seed=1, family=family), y)
    params = dict(model.named_parameters())
    assert not [n for n, v in frozen.items() if not torch.equal(params[n].detach(), v)]
    model.zero_grad()
    model.train()
    torch.nn.functional.cross_entropy(model(images(8, seed=2, family=family)), y).backward()
    m.after_backward(model)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, f"{name} on {family}: trainable tensors without gradient: {dead[:6]}"


@pytest.mark.parametrize("name,family", [c for c in CASES if METHODS.get(c[0]).identity_at_init])
def test_identity_at_init(name, family):
    model, _ = build(name, backbone=TINY[family])
    x = images(2, family=family)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(family).eval()(x))


@pytest.mark.parametrize("name,family", [c for c in CASES if METHODS.get(c[0]).mergeable])
def test_merge(name, family):
    model, m = ready(name, family)
    train_step(model, m, images(4, family=family), torch.tensor([0, 1, 2, 3]), lr=5e-2)
    x = images(2, seed=4, family=family)
    with torch.no_grad():
        before = model.eval()(x)
        m.merge(model)
        assert (model(x) - before).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(plain(family).state_dict())


def test_required_methods_are_defined_on_swin():
    """Issue 4: methods whose authors define them on Swin run there."""
    have = {n for n, f in CASES if f == "swin"}
    assert {"lora", "adapter", "adaptformer", "bitfit", "full", "linear", "ssf", "fact_tt", "fact_tk", "repadapter"} <= have


def test_required_methods_are_defined_on_video():
    """Issue 11: the anchors' video methods run on both video families; the ViT-natural image methods on
    VideoMAE too (the class-token/prompt methods, the 2-D-grid convolution ones and SPT/GPS do not)."""
    required = {"full", "linear", "bitfit", "adaptformer", "lora", "prefix", "bapat", "patt"}
    assert required <= {n for n, f in CASES if f == "video_swin"}
    assert required | {"adapter", "ssf", "fact_tt", "repadapter", "snell", "arc", "dora", "vera"} <= \
        {n for n, f in CASES if f == "video_vit"}
    assert not {"vpt_shallow", "vpt_deep", "noah", "convpass"} & {n for n, f in CASES if f in VIDEO}
