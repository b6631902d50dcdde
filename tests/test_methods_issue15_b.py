"""E2VPT, GLoRA, VQT, DyT: exact ViT-B/16 counts (official build arithmetic) and each method's own behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import backbones
from helpers import TINY_VIT, build, images, trainable, vit_b16_params


def glora_linear(out_f, in_f, r=4):
    """Official supernet tensors of one linear: Ad/Bd out×r, Au/Bu r×in, Cd in×r, Cu r×1, D, E out."""
    return 2 * r * (out_f + in_f) + r * (in_f + 1) + 2 * out_f


VIT_B16 = [
    # visual prompts 12·p·768 + shared KV prompts 12·(12 heads·n·64); default dataset dsprites_loc: p = n = 5
    ("e2vpt", (), 12 * 5 * 768 + 12 * 12 * 5 * 64),
    ("e2vpt", ("dataset=vtab/caltech101",), 12 * 32 * 768 + 12 * 5 * 768),   # command.txt: P 32, VK 5
    ("e2vpt", ("method.share_kv=false",), 12 * 5 * 768 + 2 * 12 * 5 * 768),
    ("e2vpt", ("method.mask=true",), 92_160 + 5 + 5 * 16),                  # token + segment masks
    # qkv (768→2304), proj, fc1 (768→3072), fc2 (3072→768) of 12 blocks, rank 4
    ("glora", (), 12 * (glora_linear(2304, 768) + glora_linear(768, 768) + glora_linear(3072, 768)
                        + glora_linear(768, 3072))),
    # T query tokens per layer: dsprites_loc T = 20 (run_demo_exp.sh), cifar100 T = 1
    ("vqt", (), 12 * 20 * 768),
    ("vqt", ("dataset=vtab/cifar100",), 9_216),
    # per block: adapter 768·16+16 + 16·768+768, dispatcher 768+1
    ("dyt", (), 12 * (768 * 16 + 16 + 16 * 768 + 768 + 769)),
]


@pytest.mark.parametrize("name,over,count", VIT_B16)
def test_vit_b16_trainable_counts(name, over, count):
    rep = vit_b16_params(name, *over)
    assert rep["trainable_params"] == count


def test_vit_b16_literal_counts():
    assert [vit_b16_params(n)["trainable_params"] for n in ("e2vpt", "glora", "vqt", "dyt")] == \
        [92_160, 1_603_776, 184_320, 313_548]
    assert vit_b16_params("glora")["head_params"] == 76_900
    # VQT's head reads 768·(1 + 12·T) features: T = 1, 100 classes
    assert vit_b16_params("vqt", "method.num_queries=1")["head_params"] == (768 * 13 + 1) * 100 == 998_500


# -- GLoRA -------------------------------------------------------------------------------------------
def test_glora_formula_and_searched_config():
    from methods.glora import GLoRALinear, param_count

    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    for p in base.parameters():
        p.requires_grad_(False)
    cfg = {"A": "LoRA_2", "B": "vector", "C": "LoRA_3", "D": "constant", "E": "vector"}
    g = GLoRALinear(base, cfg, rank=4)
    assert {n: tuple(p.shape) for n, p in g.named_parameters() if p.requires_grad} == \
        {"Ad": (5, 2), "Au": (2, 6), "Bd": (5,), "Cd": (6, 3), "Cu": (3, 1), "Dd": (), "Ed": (5,)}
    assert sum(p.numel() for p in g.parameters() if p.requires_grad) == param_count([cfg], [(5, 6)], 4) == 2 * 11 + 5 + 3 * 7 + 1 + 5
    with torch.no_grad():
        for p in g.parameters():
            if p.requires_grad:
                p.normal_()
    x = torch.randn(3, 6)
    W, b = base.weight, base.bias
    A, B, C = g.Ad @ g.Au, g.Bd[:, None], g.Cd @ g.Cu
    ref = x @ (W + W * A + B).t() + b + b * g.Dd + g.Ed + (W @ C).squeeze(1)
    torch.testing.assert_close(g(x), ref)
    merged = g.merged()
    torch.testing.assert_close(merged(x), ref)


def test_glora_config_list_file_and_errors(tmp_path):
    import json

    one = {"A": "none", "B": "none", "C": "none", "D": "vector", "E": "constant"}
    model, _ = build("glora", config=one)  # one dict for every linear: D (out) + E (1)
    assert trainable(model) == 2 * ((96 + 1) + (32 + 1) + (64 + 1) + (32 + 1))
    f = tmp_path / "subnet.json"
    f.write_text(json.dumps([one] * 8))
    model2, _ = build("glora", config=str(f))
    assert trainable(model2) == trainable(model)
    ck = tmp_path / "checkpoint-19.pth.tar"  # the official evolution checkpoint: best candidate first
    torch.save({"keep_top_k": {10: [], 50: [tuple([one] * 8), tuple([{"A": "LoRA_4"}] * 8)]}, "epoch": 19}, ck)
    model3, _ = build("glora", config=str(ck))
    assert trainable(model3) == trainable(model)
    with pytest.raises(ValueError, match="8 wrapped linears"):
        build("glora", config=[one] * 3)
    with pytest.raises(ValueError, match="cannot be 'constant'"):
        build("glora", config={**one, "C": "constant"})


# -- E2VPT -------------------------------------------------------------------------------------------
def test_e2vpt_prompts_kv_and_init():
    model, m = build("e2vpt")  # no dataset: default [5, 5]
    attn = model.blocks[0].attn
    kv = attn.prefix.kv
    assert kv.shape == (2, 5, 16)  # (heads, n, head_dim)
    assert kv.abs().max() <= math.sqrt(6.0 / (5 * 16)) + 1e-6
    pk, pv = attn.prefix()
    assert pk is pv and pk.shape == (5, 32)
    assert torch.equal(pk[1, 16:], kv[1, 1])  # (n, H·d) layout: head h holds columns h·d..(h+1)·d
    p0 = model.blocks[0].petl["tokens"][0].prompts
    assert p0.bound == pytest.approx(math.sqrt(6.0 / (3 * 8 * 8 + 32)))
    assert trainable(model) == 2 * 5 * 32 + 2 * 5 * 32
    lens = []
    model.blocks[1].attn.register_forward_hook(lambda mod, i, o: lens.append(i[0].shape[1]))
    model.eval()
    model(images(2))
    assert lens == [1 + 5 + 16]  # CLS, 5 prompts (replaced), 16 patches


def test_e2vpt_masks_importance_and_rewind():
    from methods.e2vpt import importance, masks_to_prune

    model, m = build("e2vpt", num_prompts=10, mask=True)
    mask = model.petl_prompt_mask
    assert mask.token.requires_grad and mask.piece.shape == (10, 16)
    x = images(4)
    loader = [(x, torch.tensor([0, 1, 2, 3])), (images(4, seed=3), torch.tensor([4, 5, 6, 7]))]
    tok, pie = importance(model, loader, torch.nn.CrossEntropyLoss())
    assert tok.shape == (10,) and pie.shape == (10, 16) and tok.abs().sum() > 0
    tokens, pieces = masks_to_prune(tok, pie, 30, 50)
    assert len(tokens) == 3 and all(len(v) == 8 for v in pieces.values())
    assert set(tokens) == set(torch.argsort(tok)[:3].tolist())
    assert len(masks_to_prune(tok, pie, 90, 90)[0]) == 9  # at least one token and 4 segments stay
    assert all(len(v) == 12 for v in masks_to_prune(tok, pie, 90, 90)[1].values())
    # rewind: fixed masks from the official files' content, prompts of pruned tokens contribute 0
    model2, _ = build("e2vpt", num_prompts=10, rewind_tokens=tokens, rewind_pieces={0: [1, 2]})
    mk = model2.petl_prompt_mask
    assert not isinstance(mk.token, torch.nn.Parameter) and mk.token.sum() == 7
    p = model2.blocks[0].petl["tokens"][0].prompts
    p.eval()
    out = p.expand(1)[0]
    assert torch.count_nonzero(out[tokens]) == 0
    assert torch.count_nonzero(out[0, 1::16]) == 0 and torch.count_nonzero(out[0, 2::16]) == 0  # strided segments
    assert trainable(model2) == trainable(build("e2vpt", num_prompts=10)[0])


# -- VQT ---------------------------------------------------------------------------------------------
def test_vqt_queries_do_not_change_the_frozen_path_and_head_concat():
    from methods.blocks.side import pool_tokens

    model, m = build("vqt", num_queries=2)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == 32 * (1 + 2 * 2)
    assert backbones.head_of(model) is model.head
    assert torch.allclose(model.head.bias, torch.full_like(model.head.bias, -math.log(99)))
    torch.manual_seed(0)
    ref = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10).eval()
    model.eval()
    x = images(3)
    with torch.no_grad():
        cls_ref = pool_tokens(ref, ref.forward_features(x))
        feats = model.forward_features(x)
        assert feats.shape[1] == 17  # queries removed after every block
        torch.testing.assert_close(pool_tokens(model, feats), cls_ref, rtol=1e-5, atol=1e-6)
        taps = model.petl_side.taps
        assert [t.last.shape for t in taps] == [(3, 2, 32)] * 2
        z = torch.cat([F.normalize(pool_tokens(model, feats), dim=1)] +
                      [F.normalize(t.last.reshape(3, -1), dim=1) for t in taps], dim=1)
        torch.testing.assert_close(model(x), model.head(z))
    keys = set(ref.state_dict()) - {"head.weight", "head.bias"}
    assert keys <= set(model.state_dict())
    assert trainable(model) == 2 * 2 * 32


# -- DyT ---------------------------------------------------------------------------------------------
def test_dyt_dispatch_ste_and_losses():
    from methods.dyt import gumbel_sigmoid_hard

    logits = torch.tensor([-3.0, 0.5, 4.0], requires_grad=True)
    s = gumbel_sigmoid_hard(logits, 5.0, training=False)
    assert s.tolist() == [0.0, 1.0, 1.0]
    s.sum().backward()
    torch.testing.assert_close(logits.grad, torch.sigmoid(logits) * (1 - torch.sigmoid(logits)))
    model, m = build("dyt")
    assert trainable(model) == 2 * (32 * 16 + 16 + 16 * 32 + 32 + 33)
    model.train()
    x, y = images(4), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    sel = m._selects()
    assert sel.shape == (4, 2, 16) and set(sel.unique().tolist()) <= {0.0, 1.0}
    ce = F.cross_entropy(logits, y)
    m.cfg["distill"] = False
    flops = m.training_loss(model, x, y, logits, ce)
    torch.testing.assert_close(flops, ce + 2.0 * (sel.mean() - 0.5) ** 2)
    m.cfg["distill"] = True
    torch.manual_seed(1)
    total = m.training_loss(model, x, y, logits, ce)
    assert total > flops and all(not d.complete for d in m.dispatchers)
    # complete model: every token through the MLP (no dispatch) -- equals the frozen model when the adapter is 0
    model.eval()
    torch.manual_seed(0)
    ref = backbones.build(OmegaConf.create(TINY_VIT), num_classes=10).eval()
    for d in m.dispatchers:
        d.complete = True
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    for d in m.dispatchers:
        d.complete = False
    assert 0.0 <= m.dispatch_ratio() <= 1.0


def test_training_loss_hook_is_used_by_the_engine():
    """The engine's step loss comes from the task kind, which hands it to ``Method.training_loss``."""
    import torch

    from bench import kinds

    class Plus1:
        def training_loss(self, model, x, y, logits, loss):
            return loss + 1.0

    model = torch.nn.Linear(4, 3)
    batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    kind = kinds.get("image_cls")
    plain = kind.train_loss(model, batch, torch.nn.CrossEntropyLoss())
    assert torch.allclose(kind.train_loss(model, batch, torch.nn.CrossEntropyLoss(), Plus1()), plain + 1.0)
