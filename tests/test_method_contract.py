"""Behaviour every registered method must show on a tiny ViT (new methods are picked up automatically)."""
import pytest
import torch

import backbones
from bench.registry import METHODS
from datasets.base import ImageTensorDataset, make_loader
from helpers import TINY_VIT, build, images

ALL = [n for n in METHODS.names() if not getattr(METHODS.get(n), "dense_only", False)]  # dense-only (e3va): tests/test_dense.py


def tiny_loader(n=16, classes=10, size=32):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    ds = ImageTensorDataset(imgs, torch.arange(n) % classes, [0.5] * 3, [0.5] * 3)
    return make_loader(ds, 8, shuffle=False)


def ready(name, **over):
    """A tiny model with the method applied and prepared (data-dependent methods)."""
    model, m = build(name, **over)
    if m.needs_prepare:
        m.prepare(model, tiny_loader(), torch.nn.CrossEntropyLoss())
    return model, m


def frozen_reference(seed=0):
    torch.manual_seed(seed)
    from omegaconf import OmegaConf

    return backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)


def train_step(model, m, x, y, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    logits = model(x)
    loss = m.training_loss(model, x, y, logits, torch.nn.functional.cross_entropy(logits, y))
    opt.zero_grad()
    m.before_backward(model, loss)
    loss.backward()
    m.after_backward(model)
    m.before_step(model, opt)
    opt.step()
    m.after_step(model, opt)
    return loss


@pytest.mark.parametrize("name", ALL)
def test_frozen_tensors_bit_identical_after_step(name):
    model, m = ready(name, )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_step(model, m, images(4), torch.tensor([0, 1, 2, 3]))
    after = dict(model.named_parameters())
    changed = [n for n, v in before.items() if not torch.equal(after[n].detach(), v)]
    assert not changed, f"frozen tensors changed: {changed[:5]}"
    head = {id(p) for p in backbones.head_of(model).parameters()}
    assert all(p.requires_grad for p in backbones.head_of(model).parameters())
    assert any(p.requires_grad for p in model.parameters() if id(p) not in head) or name == "linear"


@pytest.mark.parametrize("name", ALL)
def test_every_trainable_tensor_gets_gradient(name):
    """After one step (so zero-initialised factors move), every trainable tensor gets a non-zero
    gradient: a branch with both factors zero would fail this."""
    model, m = ready(name)
    with torch.no_grad():  # pretrained biases are non-zero (GLoRA's b ⊙ D has no gradient when b = 0)
        for n, p in model.named_parameters():
            if not p.requires_grad and n.endswith(".bias"):
                p.add_(0.01)
    x, y = images(8, seed=1), torch.arange(8) % 10
    train_step(model, m, x, y)
    model.zero_grad()
    model.train()
    x2 = images(8, seed=2)
    logits = model(x2)
    m.training_loss(model, x2, y, logits, torch.nn.functional.cross_entropy(logits, y)).backward()  # the method's own loss
    m.after_backward(model)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not dead, f"trainable tensors without gradient: {dead[:8]}"


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).identity_at_init])
def test_identity_at_init(name):
    ref = frozen_reference().eval()
    model, _ = build(name)
    model.eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x)), "logits differ from the frozen model at step 0"


@pytest.mark.parametrize("name", [n for n in ALL if METHODS.get(n).mergeable])
def test_merge_is_exact_and_leaves_plain_backbone(name):
    model, m = ready(name)
    train_step(model, m, images(4), torch.tensor([0, 1, 2, 3]), lr=5e-2)  # move away from init
    model.eval()
    x = images(3, seed=5)
    with torch.no_grad():
        before = model(x)
        m.merge(model)
        after = model(x)
    assert (before - after).abs().max().item() <= 1e-5
    plain = frozen_reference()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())
    assert set(model.state_dict()) == set(plain.state_dict()), "extra modules left after merge"
    assert all(len(b.petl) == 0 for b in model.blocks)
