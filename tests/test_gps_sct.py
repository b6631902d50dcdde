"""GPS (top-k gradient-selected connections per neuron) and SCT (salient channel tuning)."""
import pytest
import torch
from omegaconf import OmegaConf

import backbones
from datasets.base import ImageTensorDataset, make_loader
from helpers import TINY_VIT, build, images, trainable, vit_b16_params
from methods.gps import supcon_loss
from methods.sct import ChannelAdapter


def loader(n=48, classes=4, bs=16):
    g = torch.Generator().manual_seed(5)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return make_loader(ImageTensorDataset(imgs, torch.arange(n) % classes, [0.5] * 3, [0.5] * 3), bs, shuffle=False)


def plain(seed=0):
    torch.manual_seed(seed)
    return backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)


# -- GPS ------------------------------------------------------------------------------------------
def test_gps_counts_on_vit_b16():
    assert vit_b16_params("gps")["trainable_params"] == 167_424  # 83,712 weights + 83,712 biases
    assert vit_b16_params("gps", "method.k=2")["trainable_params"] == 251_136


def test_gps_tiny_structural_count_and_frozen_norms():
    model, _ = build("gps")
    rows = 32 + 2 * (96 + 32 + 64 + 32)  # patch-embed conv rows + per block qkv, proj, fc1, fc2 rows
    assert trainable(model) == rows + rows  # k=1 weight per row + every non-norm bias
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("norm" in n for n in names) and "cls_token" not in names and "pos_embed" not in names
    assert "patch_embed.proj.delta" in names and "blocks.0.attn.qkv.base.bias" in names


def test_gps_selects_topk_of_summed_gradient_per_row():
    model, m = build("gps", loss="ce", k=2)
    m.prepare(model, loader(), torch.nn.CrossEntropyLoss())
    ref = plain()
    ref.train()
    w = ref.blocks[1].mlp.fc1.weight
    w2 = ref.patch_embed.proj.weight
    for p in ref.parameters():
        p.requires_grad_(False)
    w.requires_grad_(True)
    w2.requires_grad_(True)
    acc, acc2 = torch.zeros_like(w), torch.zeros_like(w2)
    for x, y in loader():
        g, g2 = torch.autograd.grad(torch.nn.functional.cross_entropy(ref(x), y), [w, w2])
        acc += g
        acc2 += g2
    for a, mod in ((acc, model.blocks[1].mlp.fc1), (acc2.reshape(32, -1), model.patch_embed.proj)):
        cols = torch.topk(a.abs(), 2, dim=1).indices
        expect = torch.sort((torch.arange(a.shape[0]).unsqueeze(1) * a.shape[1] + cols).reshape(-1)).values
        assert torch.equal(mod.weight_index, expect)
        assert mod.delta.numel() == 2 * a.shape[0]


def test_gps_supcon_prepare_and_training_keeps_base_weights():
    model, m = build("gps")
    info = m.prepare(model, loader(), torch.nn.CrossEntropyLoss())
    assert info["gps_images"] == 48 and info["gps_zero_rows"] == 0 and info["gps_loss"] == "supcon"
    base = model.blocks[0].attn.qkv.base.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert torch.equal(model.blocks[0].attn.qkv.base.weight, base)
    assert model.blocks[0].attn.qkv.delta.abs().sum() > 0
    groups = m.param_groups(model, 1e-3, 1e-4)
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim == 1 for p in groups[1]["params"])


def test_supcon_matches_naive_definition():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(6, 2, 5), dim=-1)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    t = 0.07
    z = f.transpose(0, 1).reshape(12, 5)
    lab = y.repeat(2)
    losses = []
    for i in range(12):
        others = [a for a in range(12) if a != i]
        denom = torch.logsumexp(torch.stack([z[i] @ z[a] / t for a in others]), 0)
        pos = [a for a in others if lab[a] == lab[i]]
        losses.append(-torch.stack([z[i] @ z[p] / t - denom for p in pos]).mean())
    assert torch.allclose(supcon_loss(f, y, t), torch.stack(losses).mean(), atol=1e-5)


def test_gps_bad_config():
    with pytest.raises(ValueError, match="method.k"):
        build("gps", k=0)
    with pytest.raises(ValueError, match="method.loss"):
        build("gps", loss="mse")


# -- SCT ------------------------------------------------------------------------------------------
def test_sct_counts_on_vit_b16():
    assert vit_b16_params("sct")["trainable_params"] == 111_744  # 12 · (96·96 + 96)
    assert vit_b16_params("sct", "method.channels=96")["trainable_params"] == 111_744
    assert vit_b16_params("sct", "method.channels=192")["trainable_params"] == 12 * (192 * 192 + 192)


def test_sct_selection_is_class_averaged_l2_of_post_attention_stream():
    model, m = build("sct", channels=5)
    assert trainable(model) == 2 * (5 * 5 + 5)
    info = m.prepare(model, loader(), torch.nn.CrossEntropyLoss())
    ref = plain().eval()
    sums = [dict() for _ in ref.blocks]
    seen = {}
    hooks = [b.norm2.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0]))
             for i, b in enumerate(ref.blocks)]
    with torch.no_grad():
        for x, y in loader():
            ref(x)
            for i in range(len(ref.blocks)):
                h = seen[i][:, 1:, :]
                for c in y.unique().tolist():
                    v = (h[y == c] ** 2).sum((0, 1))
                    sums[i][c] = sums[i].get(c, 0) + v
    for h in hooks:
        h.remove()
    for i, a in enumerate(m.adapters):
        f = torch.stack([v.sqrt() for v in sums[i].values()]).mean(0)
        assert torch.equal(a.index, torch.sort(torch.topk(f, 5).indices).values)
        assert info["sct_channels"][i] == a.index.tolist()
    assert info["sct_classes"] == 4 and info["sct_images"] == 48


def test_sct_adapter_op_and_scale_option():
    torch.manual_seed(0)
    a = ChannelAdapter(8, 3)
    a.index.copy_(torch.tensor([1, 4, 6]))
    x = torch.randn(2, 5, 8)
    out = a(x)
    untouched = [0, 2, 3, 5, 7]
    assert torch.equal(out[..., untouched], x[..., untouched])
    upd = a.linear(x[..., [1, 4, 6]])
    assert torch.allclose(out[..., [1, 4, 6]], x[..., [1, 4, 6]] + upd, atol=1e-6)
    a.scale = 0.25
    assert torch.allclose(a(x)[..., [1, 4, 6]], x[..., [1, 4, 6]] + 0.25 * upd, atol=1e-6)


def test_sct_default_scale_is_the_repos_unused_scale():
    model, m = build("sct")
    assert all(a.scale is None for a in m.adapters)
    model2, m2 = build("sct", scale=0.4)
    assert all(a.scale == 0.4 for a in m2.adapters)


@pytest.mark.parametrize("bad", [0, 40, 2.5, -0.1])
def test_sct_bad_channels(bad):
    with pytest.raises(ValueError, match="method.channels"):
        build("sct", channels=bad)
