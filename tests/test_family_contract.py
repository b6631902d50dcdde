"""The method contract on the tiny Swin and ConvNeXt for every method defined on those families."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import backbones
from bench import CONF_DIR
from bench.registry import METHODS
from helpers import build, images
from test_method_contract import tiny_loader, train_step

TINY = {f: OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "backbone" / f"{f}_micro.yaml"))
        for f in ("swin", "convnext")}
CASES = [(n, f) for n in METHODS.names() for f in TINY if f in METHODS.get(n).families]


def ready(name, family, **over):
    model, m = build(name, backbone=TINY[family], **over)
    if m.needs_prepare:
        m.prepare(model, tiny_loader(), torch.nn.CrossEntropyLoss())
    return model, m


def plain(family):
    torch.manual_seed(0)
    return backbones.build(OmegaConf.create(TINY[family]), num_classes=10)


@pytest.mark.parametrize("name,family", CASES)
def test_step_gradients_and_frozen_tensors(name, family):
    model, m = ready(name, family)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    y = torch.arange(8) % 10
    train_step(model, m, images(8, seed=1), y)
    params = dict(model.named_parameters())
    assert not [n for n, v in frozen.items() if not torch.equal(params[n].detach(), v)]
    model.zero_grad()
    model.train()
    torch.nn.functional.cross_entropy(model(images(8, seed=2)), y).backward()
    m.after_backward(model)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, f"{name} on {family}: trainable tensors without gradient: {dead[:6]}"


@pytest.mark.parametrize("name,family", [c for c in CASES if METHODS.get(c[0]).identity_at_init])
def test_identity_at_init(name, family):
    model, _ = build(name, backbone=TINY[family])
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain(family).eval()(x))


@pytest.mark.parametrize("name,family", [c for c in CASES if METHODS.get(c[0]).mergeable])
def test_merge(name, family):
    model, m = ready(name, family)
    train_step(model, m, images(4), torch.tensor([0, 1, 2, 3]), lr=5e-2)
    x = images(2, seed=4)
    with torch.no_grad():
        before = model.eval()(x)
        m.merge(model)
        assert (model(x) - before).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(plain(family).state_dict())


def test_required_methods_are_defined_on_swin():
    """Issue 4: methods whose authors define them on Swin run there."""
    have = {n for n, f in CASES if f == "swin"}
    assert {"lora", "adapter", "adaptformer", "bitfit", "full", "linear", "ssf", "fact_tt", "fact_tk", "repadapter"} <= have
