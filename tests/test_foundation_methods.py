"""The foundation's six methods: exact counts on ViT-B/16 and their specific behaviour."""
import math

import pytest
import torch

from helpers import build, images, trainable, vit_b16_params

VIT_B16 = {"full": 85_798_656, "linear": 0, "bitfit": 102_912, "lora": 294_912, "adapter": 156_768, "vpt_shallow": 76_800}


@pytest.mark.parametrize("name,count", VIT_B16.items())
def test_vit_b16_trainable_counts(name, count):
    rep = vit_b16_params(name)
    assert rep["trainable_params"] == count
    assert rep["head_params"] == 76_900
    assert rep["method"] == name and rep["backbone"] == "vit_b16"


def test_vit_b16_backbone_size():
    rep = vit_b16_params("full")
    assert rep["total_params"] - rep["head_params"] == 85_798_656


def test_lora_structure_and_init():
    model, _ = build("lora")
    qkv = model.blocks[0].attn.qkv
    assert set(qkv.deltas) == {"q", "v"}
    for d in qkv.deltas.values():
        assert torch.count_nonzero(d.B) == 0 and torch.count_nonzero(d.A) > 0
        assert d.scale == 1.0
    assert trainable(model) == 2 * 2 * (2 * 32 * 8)  # depth 2, q and v, A and B


def test_lora_merge_removes_wrappers():
    model, m = build("lora")
    with torch.no_grad():
        for b in model.blocks:
            for d in b.attn.qkv.deltas.values():
                d.B.normal_()
    x = images(2)
    before = model(x)
    m.merge(model)
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)
    assert (model(x) - before).abs().max() <= 1e-5


def test_vpt_shallow_sequence_and_init():
    model, _ = build("vpt_shallow", num_prompts=5)
    p = model.blocks[0].petl["tokens"][0].prompts.tokens
    bound = math.sqrt(6 / 32)
    assert p.shape == (1, 5, 32) and p.abs().max() <= bound
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, i, o: seen.update(n=o.shape[1]))
    model(images(2))
    assert seen["n"] == 1 + 5 + 16  # cls + prompts + 4x4 patches


def test_bitfit_trains_exactly_the_biases():
    model, _ = build("bitfit")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith("bias") or n.startswith("head.") for n in names)
    assert "blocks.0.norm1.bias" in names and "patch_embed.proj.bias" in names


def test_adapter_is_sequential_after_mlp():
    model, _ = build("adapter")
    ad = model.blocks[1].petl["mlp_after"][0]
    assert ad.f.down.out_features == 8 and torch.count_nonzero(ad.f.up.weight) == 0


def test_params_on_vtab_cifar100_config():
    """Issue 3: the VTAB dataset config sets the head size (100 classes) without any data."""
    rep = vit_b16_params("lora", "dataset=vtab/cifar100")
    assert rep["trainable_params"] == 294_912 and rep["head_params"] == 76_900
