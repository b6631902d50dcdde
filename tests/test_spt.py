"""SPT (spt_lora, spt_adapter): eligible tensors, sensitivity, allocation, official files, sparse deltas."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import backbones
from backbones import sites
from bench.metrics import count_params
from datasets.base import ImageTensorDataset, make_loader
from helpers import TINY_VIT, build, compose_cfg, images, trainable, vit_b16_params
from methods.blocks import sparse_delta as sd
from methods.blocks.sparse_delta import SparseDeltaLinear
from methods.spt import (OPS, _Allocator, allocate, eligible_entries, parse_budget, selection_count,
                         selection_from_official, structured_cost, synthetic_scores)


def tiny_loader(n=64, classes=10, bs=32):
    g = torch.Generator().manual_seed(3)
    imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return make_loader(ImageTensorDataset(imgs, torch.arange(n) % classes, [0.5] * 3, [0.5] * 3), bs, shuffle=False)


def frozen(seed=0):
    torch.manual_seed(seed)
    return backbones.build(OmegaConf.create(TINY_VIT), num_classes=10)


def prepared(name, budget="3k", context=None, **over):
    model, m = build(name, budget=budget, **over)
    m.context = dict(context or {})
    info = m.prepare(model, tiny_loader(), torch.nn.CrossEntropyLoss())
    return model, m, info


def b16_meta():
    return backbones.build(compose_cfg(["backbone=vit_b16"]).backbone, num_classes=100, device="meta")


# -- sparse delta ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,ratio,block", [(sd.CHUNK_ELEMS, 16, 1e9), (7, 16, 1e9), (sd.CHUNK_ELEMS, 1, 1e9),
                                               (7, 1, 1e9), (sd.CHUNK_ELEMS, 16, 1)])
def test_sparse_delta_equals_dense_scatter_outputs_and_gradients(monkeypatch, chunk, ratio, block):
    monkeypatch.setattr(sd, "CHUNK_ELEMS", chunk)  # 7: many chunks
    monkeypatch.setattr(sd, "BLOCK_RATIO", block)  # 1: the sub-block route, 1e9: never
    monkeypatch.setattr(sd, "GATHER_RATIO", ratio)  # 16: 17 of 120 positions form W + scatter(Δ); 1: gather path
    monkeypatch.setattr(sd, "TOKEN_BUDGET", 1e9)  # let GATHER_RATIO alone pick the path at this tiny size
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10).requires_grad_(False)
    bidx = torch.tensor([1, 4, 9])
    m = SparseDeltaLinear(base, torch.randperm(120)[:17], bidx)
    widx = m.weight_index  # stored sorted: delta[k] sits at weight_index[k]
    with torch.no_grad():
        m.delta.normal_()
        m.bias_delta.normal_()
    x = torch.randn(3, 5, 12, requires_grad=True)
    y = m(x)
    # dense reference: W + scatter(Δ) through plain autograd
    dw = m.delta.detach().clone().requires_grad_(True)
    db = m.bias_delta.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w_ref = base.weight.detach().reshape(-1) + torch.zeros(120).index_add(0, widx, dw)  # dense W + scatter(Δ)
    b_ref = base.bias.detach() + torch.zeros(10).index_add(0, bidx, db)
    y_ref = torch.nn.functional.linear(x2, w_ref.view(10, 12), b_ref)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)
    assert torch.allclose(m.delta.grad, dw.grad, atol=1e-5)
    assert torch.allclose(m.bias_delta.grad, db.grad, atol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None


def test_sub_block_route_for_clustered_positions():
    """Positions in 40 rows x 30 columns of a 768x768 matrix take the sub-block route at any token count;
    30,000 positions spread over all rows and columns form W + scatter(Δ)."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(768, generator=g)[:40]
    cols = torch.randperm(768, generator=g)[:30]
    idx = (rows[torch.randint(0, 40, (600,), generator=g)] * 768 + cols[torch.randint(0, 30, (600,), generator=g)]).unique()
    m = SparseDeltaLinear(torch.nn.Linear(768, 768), idx)
    u, v, loc = m.block_rows, m.block_cols, m.block_loc
    assert u.numel() <= 40 and v.numel() <= 30
    assert torch.equal(u[torch.div(loc, v.numel(), rounding_mode="floor")] * 768 + v[loc % v.numel()], m.weight_index)
    block = (u, v, loc)
    assert sd._route(idx.numel(), 768 * 768, 32 * 197, 0, block) == "block"
    spread = SparseDeltaLinear(torch.nn.Linear(768, 768), torch.randperm(768 * 768, generator=g)[:30000])
    assert sd._route(30000, 768 * 768, 32 * 197, 0, (spread.block_rows, spread.block_cols, spread.block_loc)) == "dense"


def test_gather_only_while_cheaper_than_forming_the_weight():
    """ViT-B 768×768 with 300 positions: gather for a few images, form W + scatter(Δ) at batch 32 (6,304 tokens)."""
    assert sd._use_gather(300, 768 * 768, tokens=197)
    assert not sd._use_gather(300, 768 * 768, tokens=32 * 197)
    assert not sd._use_gather(768 * 768 // 8, 768 * 768, tokens=1)  # many positions: always the dense form


@pytest.mark.parametrize("chunk", [sd.CHUNK_ELEMS, 5])
def test_row_regular_sparse_delta_equals_dense(monkeypatch, chunk):
    """k positions in every row (GPS): the reshape-sum path gives the dense reference's outputs and grads."""
    monkeypatch.setattr(sd, "CHUNK_ELEMS", chunk)
    monkeypatch.setattr(sd, "GATHER_RATIO", 1)  # 30 of 120 positions: take the gather path
    monkeypatch.setattr(sd, "TOKEN_BUDGET", 1e9)
    torch.manual_seed(2)
    base = torch.nn.Linear(12, 10).requires_grad_(False)
    cols = torch.stack([torch.randperm(12)[:3] for _ in range(10)])
    idx = (torch.arange(10).unsqueeze(1) * 12 + cols).reshape(-1)
    m = SparseDeltaLinear(base, idx)
    assert m.row_k == 3 and SparseDeltaLinear(base, idx[1:]).row_k == 0
    with torch.no_grad():
        m.delta.normal_()
    x = torch.randn(2, 7, 12, requires_grad=True)
    dw = m.delta.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    w_ref = base.weight.reshape(-1) + torch.zeros(120).index_add(0, m.weight_index, dw)
    y, y_ref = m(x), torch.nn.functional.linear(x2, w_ref.view(10, 12), base.bias)
    assert torch.allclose(y, y_ref, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.allclose(x.grad, x2.grad, atol=1e-5) and torch.allclose(m.delta.grad, dw.grad, atol=1e-5)


def test_sparse_delta_identity_at_zero_and_exact_merge():
    torch.manual_seed(1)
    base = torch.nn.Linear(8, 6)
    x = torch.randn(4, 8)
    ref = base(x)
    m = SparseDeltaLinear(base, torch.tensor([0, 5, 47]), torch.tensor([2]))
    assert torch.equal(m(x), ref)
    big = SparseDeltaLinear(base, torch.arange(0, 48, 2))  # the other path (W + scatter(Δ)) is exact too
    assert torch.equal(big(x), ref)
    with torch.no_grad():
        m.delta.fill_(0.5)
        m.bias_delta.fill_(-1.0)
    out = m(x)
    merged = m.merged()
    assert torch.allclose(merged(x), out, atol=1e-6)
    assert merged.weight.view(-1)[47].item() == pytest.approx(base.weight.view(-1)[47].item())
    with pytest.raises(ValueError, match="duplicate"):
        SparseDeltaLinear(torch.nn.Linear(8, 6), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="out of range"):
        SparseDeltaLinear(torch.nn.Linear(8, 6), torch.tensor([48]))


# -- eligible tensors and sensitivity -------------------------------------------------------------
def test_vit_b16_eligible_tensors_match_official():
    ent = eligible_entries(sites(b16_meta()))
    mats = [e for e in ent if e.kind == "matrix"]
    vecs = [e for e in ent if e.kind == "vector"]
    assert (len(ent), sum(e.numel for e in ent)) == (194, 85_056_000)
    assert (len(mats), sum(e.numel for e in mats)) == (72, 84_934_656)
    assert (len(vecs), sum(e.numel for e in vecs)) == (122, 121_344)
    assert ent[2].name == "blocks.0.attn.q.weight" and ent[-1].name == "norm.bias"
    e = {x.name: x for x in ent}
    assert [structured_cost("lora", e[f"blocks.0.{p}.weight"], 8) for p in ("attn.q", "mlp.fc1", "mlp.fc2")] == [12288, 30720, 30720]
    assert [structured_cost("adapter", e[f"blocks.0.{p}.weight"], 8) for p in ("attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")] == [13064, 13064, 52232, 13064]


def test_sensitivity_shapes_and_counts_on_tiny_vit():
    from methods.spt import compute_sensitivity

    model, _ = build("spt_lora")
    ent = eligible_entries(sites(model))
    assert len(ent) == 2 * 16 + 2
    assert sum(e.numel for e in ent) == 2 * (4 * 32 * 32 + 2 * 64 * 32 + (3 * 32 + 32 + 64 + 32) + 4 * 32) + 64
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    scores, n_img = compute_sensitivity(model, ent, tiny_loader(n=80, bs=32), batches=2)
    assert n_img == 64  # 2 batches of 32 out of 80 images
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    for e in ent:
        s = scores[e.name]
        assert tuple(s.shape) == e.shape and s.dtype == torch.float32
        assert torch.isfinite(s).all() and (s >= 0).all()
    assert all(scores[e.name].sum() > 0 for e in ent)
    # q, k, v are the row thirds of the fused qkv gradient
    assert not torch.equal(scores["blocks.0.attn.q.weight"], scores["blocks.0.attn.k.weight"])


def test_sensitivity_is_sum_of_squared_batch_gradients():
    from methods.spt import compute_sensitivity

    model, _ = build("spt_lora")
    model.eval()  # make the reference deterministic: no stochastic depth in the tiny model anyway
    ent = eligible_entries(sites(model))
    scores, _ = compute_sensitivity(model, ent, tiny_loader(n=64, bs=32), batches=2)
    ref = torch.zeros_like(model.blocks[1].mlp.fc2.weight)
    w = model.blocks[1].mlp.fc2.weight
    w.requires_grad_(True)
    for x, y in tiny_loader(n=64, bs=32):
        g, = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [w])
        ref += g * g
    assert torch.allclose(scores["blocks.1.mlp.fc2.weight"], ref, rtol=1e-5, atol=1e-12)


# -- budgets ---------------------------------------------------------------------------------------
def test_parse_budget():
    assert [parse_budget(v) for v in ("0.4M", "400k", 400000, "1.0M", "2e5")] == [400000] * 3 + [1000000, 200000]
    for bad in ("0.4", 0.4, "lots"):
        with pytest.raises(ValueError, match="method.budget"):
            parse_budget(bad)


def test_budget_within_two_percent_on_vit_b16_synthetic_sensitivity():
    ent = eligible_entries(sites(b16_meta()))
    scores = synthetic_scores(ent, seed=1)
    al = _Allocator(ent, scores, "lora", 8, 10, 5, 768)
    for budget in (200_000, 1_000_000):
        n, info = al.allocate(budget)
        got = al.total(n)
        assert abs(got - budget) <= 0.02 * budget, (budget, got)
        assert got <= budget
        # the type rule holds for the final counts: structured iff n >= cost/10
        structured = (n >= al.thr) & al.is_mat
        assert all(n[i] < al.thr[i] for i in range(len(ent)) if not structured[i] and al.is_mat[i])


def test_allocation_builds_exactly_the_counted_modules_on_vit_b16():
    r = vit_b16_params("spt_adapter", "method.budget=0.6M")
    assert abs(r["trainable_params"] - 600_000) <= 12_000
    assert r["head_params"] == 76_900


def test_tiny_budget_and_count_agree():
    model, m, info = prepared("spt_lora", budget="3k")
    assert info["sensitivity"] == "computed"
    assert trainable(model) == info["trainable_excl_head"]
    assert abs(info["trainable_excl_head"] - 3000) <= 60
    assert info["sparse_params"] > 0  # the tiny budget exercises the unstructured path
    kinds = {type(mod).__name__ for mod in model.modules()}
    assert "SPTLinear" in kinds


# -- official files ---------------------------------------------------------------------------------
def official_file(structured, full, n_sparse, n_norm):
    """A param_req file in the official layout with the given composition on ViT-B/16."""
    ent = eligible_entries(sites(b16_meta()))
    tm = [[0] * 6 for _ in range(12)]
    for n in structured:
        blk, op = int(n.split(".")[1]), n.split(".")[-2]
        tm[blk][OPS.index(op)] = 1
    shapes, idx, off = {}, [], 0
    rest_sparse, rest_norm = n_sparse, n_norm
    for e in ent:
        if e.name in structured or e.name in full:
            continue
        shapes[e.name] = torch.Size(e.shape)
        if e.is_norm:
            k = min(rest_norm, 30)
            rest_norm -= k
        else:
            k = min(rest_sparse, 1000 if e.kind == "matrix" else 100)
            rest_sparse -= k
        step = max(1, e.numel // max(k, 1))
        idx.append(torch.arange(k) * step + off)
        off += e.numel
    assert rest_sparse == 0 and rest_norm == 0
    idx = torch.cat(idx)
    return {"tuned_matrices": tm, "tuned_vectors": list(full), "unstructured_name_shapes": shapes,
            "unstructured_name_shapes_int": {k: math.prod(v) for k, v in shapes.items()},
            "unstructured_indexes": idx, "unstructured_params": idx.numel(),
            "structured_params": None, "params": None}


def _vectors768(n):
    names = []
    for b in range(12):
        for v in ("norm1.weight", "norm1.bias", "attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.proj.bias",
                  "norm2.weight", "norm2.bias", "mlp.fc2.bias"):
            names.append(f"blocks.{b}.{v}")
    return names[:n]


def test_official_lora_file_gives_380738(tmp_path):
    structured = [f"blocks.{b}.attn.v.weight" for b in range(7)] + [f"blocks.{b}.mlp.fc2.weight" for b in range(7)]
    d = official_file(structured, _vectors768(72), n_sparse=23_618, n_norm=171)
    d["structured_params"], d["params"] = 301_056 + 55_296, 0.380909
    p = tmp_path / "param_req_0.4.pth"
    torch.save(d, p)
    r = vit_b16_params("spt_lora", f"method.sensitivity={p}")
    assert r["trainable_params"] == 380_738
    assert r["trainable_params"] + r["head_params"] == 457_638
    # the selection object agrees, and the 171 LN entries are dropped
    ent = eligible_entries(sites(b16_meta()))
    sel = selection_from_official(torch.load(p, weights_only=False), ent, 12)
    c = selection_count(sel, ent, "lora", 8, 768)
    assert (c["structured_matrices"], c["structured_params"], c["full_vector_params"], c["sparse_params"]) == \
        (14, 301_056, 55_296, 23_618)
    assert sel.dropped_norm_entries == 171
    # the official Adapter config reads LoRA files: we build it, with Adapter costs, and flag the mismatch
    import methods
    from helpers import method_cfg

    ad = methods.build(method_cfg("spt_adapter", sensitivity=str(p)))
    model = b16_meta()
    ad.apply(model)
    assert ad.info["file_variant_mismatch"] and ad.info["structured_params"] == 14 * 13_064
    assert trainable(model) == 14 * 13_064 + 55_296 + 23_618 + 768


def test_official_adapter_file_gives_422662(tmp_path):
    structured = ([f"blocks.{b}.attn.proj.weight" for b in range(7)] + [f"blocks.{b}.mlp.fc2.weight" for b in range(7)]
                  + [f"blocks.{b}.mlp.fc1.weight" for b in range(3)])
    d = official_file(structured, _vectors768(75), n_sparse=24_702, n_norm=90)
    p = tmp_path / "param_req_0.4.pth"
    torch.save(d, p)
    assert vit_b16_params("spt_adapter", f"method.sensitivity={p}")["trainable_params"] == 422_662


def test_official_file_errors_are_one_line(tmp_path):
    p = tmp_path / "bad.pth"
    torch.save({"tuned_matrices": [[0] * 6]}, p)
    with pytest.raises(ValueError, match="lacks key"):
        build("spt_lora", sensitivity=str(p))
    with pytest.raises(FileNotFoundError, match="method.sensitivity"):
        build("spt_lora", sensitivity=str(tmp_path / "missing.pth"))


def test_export_roundtrip_through_official_format(tmp_path):
    model, m, info = prepared("spt_adapter", budget="4k")
    p = tmp_path / "param_req.pth"
    torch.save(m.export_official(), p)
    model2, m2 = build("spt_adapter", sensitivity=str(p))
    assert trainable(model2) == trainable(model) == info["trainable_excl_head"]
    assert m2.selection.structured == m.selection.structured and m2.selection.full == m.selection.full
    assert all(torch.equal(m2.selection.sparse[k], v) for k, v in m.selection.sparse.items())


# -- cache, identity, layout, optimisation ----------------------------------------------------------
def test_sensitivity_cache_is_reused(tmp_path):
    ctx = {"dataset": "synthetic/dsprites_loc", "backbone": "vit_micro_test", "checkpoint": None, "seed": 0,
           "cache_dir": str(tmp_path), "num_classes": 10}
    _, m1, i1 = prepared("spt_lora", context=ctx)
    _, m2, i2 = prepared("spt_lora", context=ctx)
    assert (i1["sensitivity"], i2["sensitivity"]) == ("computed", "loaded")
    assert i1["sensitivity_path"] == i2["sensitivity_path"] and str(tmp_path) in i1["sensitivity_path"]
    assert "sensitivity_s" in i2 and m1.selection.structured == m2.selection.structured
    assert all(torch.equal(m2.selection.sparse[k], v) for k, v in m1.selection.sparse.items())
    _, _, i3 = prepared("spt_lora", context={**ctx, "seed": 1})
    assert i3["sensitivity"] == "computed"  # another seed is another key


@pytest.mark.parametrize("name", ["spt_lora", "spt_adapter"])
def test_identity_at_init_with_modules_built(name):
    model, m, info = prepared(name, budget="4k")
    assert info["structured_matrices"] > 0 and info["sparse_params"] > 0
    model.eval()
    x = images(3)
    with torch.no_grad():
        assert torch.equal(model(x), frozen().eval()(x))


def test_structured_layouts():
    model, m, _ = prepared("spt_lora", budget="12k")
    for mod in model.modules():
        if type(mod).__name__ == "SPTLinear":
            for op, br in mod.branches.items():
                assert mod.sources[op] == "input"
                assert isinstance(br.dropout, torch.nn.Identity) == (op == "proj")
                assert torch.count_nonzero(br.B) == 0
    model, m, _ = prepared("spt_adapter", budget="12k")
    seen = set()
    for mod in model.modules():
        if type(mod).__name__ == "SPTLinear":
            for op, br in mod.branches.items():
                seen.add(op)
                assert mod.sources[op] == ("input" if op == "proj" else "output")
                assert torch.count_nonzero(br.up.weight) == 0 and torch.count_nonzero(br.up.bias) == 0
                assert br.down.bias is not None
    assert seen


def test_param_groups_no_decay_on_vectors_deltas_and_cls_token():
    model, m, _ = prepared("spt_lora", budget="4k")
    groups = m.param_groups(model, 1e-3, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "cls_token" in no_decay
    assert any(n.endswith(".delta") for n in no_decay) and "head.bias" in no_decay
    assert "head.weight" in decay and any(n.endswith(".A") for n in decay)
    assert not any(n.endswith("delta") for n in decay)
    c = count_params(model, model.head)
    assert sum(p.numel() for g in groups for p in g["params"]) == c["trainable_params"] + c["head_params"]


def test_merge_with_sparse_and_structured_is_exact():
    model, m, _ = prepared("spt_lora", budget="4k")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.nn.functional.cross_entropy(model(images(4)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    model.eval()
    x = images(3, seed=4)
    with torch.no_grad():
        before = model(x)
        m.merge(model)
        after = model(x)
    assert (before - after).abs().max() <= 1e-5
    assert set(model.state_dict()) == set(frozen().state_dict())


def test_before_prepare_only_cls_token_and_head_train():
    model, m = build("spt_lora")
    assert trainable(model) == 32  # cls_token of the tiny ViT; the head is counted apart
    assert not m.built


# -- end to end -----------------------------------------------------------------------------------
def test_budget_sweep_end_to_end_on_dsprites(tmp_path):
    from bench.run import run

    got = []
    for budget in ("20k", "40k"):
        cfg = compose_cfg(["method=spt_lora", f"method.budget={budget}", "backbone=vit_micro", "train.epochs=1",
                           "train.batch_size=32", "dataset.sizes.train=64", "dataset.sizes.val=16",
                           "dataset.sizes.test=64", "method.sensitivity_batches=2", "progress=false",
                           f"results.dir={tmp_path}", f"cache_dir={tmp_path}/cache", "device=cpu"])
        rec = run(cfg, [f"method.budget={budget}"])
        info = rec["method_info"]
        # the sensitivity is computed once and reused by the next budget of the sweep
        assert rec["status"] == "ok" and info["sensitivity"] == ("computed" if not got else "loaded")
        assert rec["trainable_params"] == info["trainable_excl_head"]
        assert abs(rec["trainable_params"] - parse_budget(budget)) <= 0.02 * parse_budget(budget)
        got.append(rec["trainable_params"])
    assert got[0] < got[1]


def test_default_budget_follows_the_backbone():
    """0.4M on ViT-B/16; vit_micro's own spt_budget (25k, the same ratio to LoRA's count) on the micro-ViT,
    whatever the dataset; method.budget on the command line wins."""
    from bench.run import params_report

    b16 = params_report(compose_cfg(["method=spt_lora", "backbone=vit_b16", "dataset.num_classes=100", "mode=params"]))
    micro = params_report(compose_cfg(["method=spt_adapter", "dataset=synthetic/textures", "mode=params"]))
    mine = params_report(compose_cfg(["method=spt_lora", "method.budget=10k", "mode=params"]))
    assert (b16["trainable_params"], micro["trainable_params"], mine["trainable_params"]) == (400_000, 25_000, 10_000)
