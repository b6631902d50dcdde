"""Pretrain ``vit_micro`` / ``swin_micro`` on formula-driven images (FractalDB-style), entirely on CPU.

``python -m tools.pretrain_micro`` generates the pretraining set from a seed
(``datasets.synthetic.fractals``: random iterated function systems, one per category), trains ``vit_micro``
with supervised classification, and writes ``backbones/weights/vit_micro_fractal.safetensors`` (fp16) with a json
beside it: generator settings, seed, epochs, steps, held-out pretraining accuracy, seconds, sha256. Same seed and
settings → the same images and (on CPU, same thread count) the same weights.

``--backbone swin_micro`` trains the micro Swin on the same task and writes
``backbones/weights/swin_micro_fractal.safetensors``: timm's Swin layout (``patch_embed.*``, ``layers.*``, the final
``norm.*``; no ``head.*``), which the image Swin loads as is and the dense Swin-Det through
``dense_checkpoint_filter`` (``norm.*`` dropped, its per-stage ``norm0..`` start as identity).

    python -m tools.pretrain_micro                                   # vit_micro (about 14 min on 2 cores)
    python -m tools.pretrain_micro --backbone swin_micro --epochs 45 --lr 2e-3 --threads 1   # classification
    python -m tools.pretrain_micro --backbone swin_micro --task seg   # the shipped swin_micro (dense pretext)

``--task seg`` (swin_micro only) pretrains on a dense pretext instead: formula-driven segmentation scenes
(``datasets.synthetic.fractal_scenes``: coloured fractals pasted on coloured gradients at 64 px, every pixel
labelled with its fractal category or background), through the Swin-Det backbone with a per-stage 1×1
classifier summed at full resolution. Classification pretraining of a backbone this small leaves its stage maps
nearly constant in space, and the embedded dense tasks then do worse than from a random backbone; the dense
pretext keeps them spatial. The file keeps the timm layout: the last stage's trained output norm is saved as
``norm.*`` (the image Swin's final norm) and the classifiers are dropped.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from bench import CONF_DIR, ROOT
from bench.imports import import_suite
from bench.results import write_json_atomic

log = logging.getLogger("pretrain_micro")
WEIGHTS = ROOT / "backbones" / "weights"
OUT = WEIGHTS / "vit_micro_fractal.safetensors"
BACKBONES = ("vit_micro", "swin_micro")


def default_out(backbone: str) -> Path:
    return WEIGHTS / f"{backbone}_fractal.safetensors"


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.pretrain_micro", description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=BACKBONES, default="vit_micro")
    ap.add_argument("--task", choices=("cls", "seg"), default="cls",
                    help="cls: classify whole fractal images; seg: label every pixel of fractal scenes (swin_micro)")
    ap.add_argument("--scenes", type=int, default=3000, help="--task seg: number of scenes (10 %% held out)")
    ap.add_argument("--scene-size", type=int, default=64, help="--task seg: scene side in pixels")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--colour", action="store_true",
                    help="recolour each image: background and fractal each get a random RGB colour (the fractal's "
                         "intensity blends the two), so the features see colour contrast in every direction, not "
                         "only luminance. Not used by the shipped weights: swin_micro at lr 2e-3 stayed at chance loss "
                         "for 18 epochs with it")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="default backbones/weights/<backbone>_fractal.safetensors")
    args = ap.parse_args(argv)
    if args.task == "seg" and args.backbone != "swin_micro":
        ap.error(f"--task seg pretrains the dense Swin; --backbone {args.backbone} takes --task cls")
    args.out = args.out or default_out(args.backbone)
    return args


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crop and horizontal flip, per batch (deterministic from ``g``)."""
    b, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (4, 4, 4, 4))
    i, j = torch.randint(0, 9, (2,), generator=g).tolist()
    x = pad[:, :, i:i + h, j:j + w]
    flip = torch.rand(b, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def colourise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Grey [B, 3, H, W] in [0, 1] → background colour (1 - t) + fractal colour t, t the intensity, one random
    pair of RGB colours per image (deterministic from ``g``)."""
    b = x.shape[0]
    c0, c1 = torch.rand(2, b, 3, 1, 1, generator=g)
    t = x[:, :1]
    return c0 * (1 - t) + c1 * t


def _schedule(opt, epochs: int, steps: int):
    from bench.optim import build_scheduler

    return build_scheduler(opt, OmegaConf.create({"epochs": epochs, "warmup_epochs": 2, "min_lr": 1e-5,
                                                  "warmup_lr": 1e-6}), steps)


def _split(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out 10 %, training) indices."""
    perm = torch.randperm(n, generator=g)
    return perm[:n // 10], perm[n // 10:]


def fit(model, params, loss_of, tr_idx: torch.Tensor, args, g: torch.Generator, desc: str) -> int:
    """AdamW + the warm-up/cosine schedule over ``args.epochs`` shuffled passes of ``tr_idx`` in batches of
    ``args.batch``; ``loss_of(batch indices)`` gives the loss. Returns the number of steps."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    steps = (len(tr_idx) + args.batch - 1) // args.batch
    sched = _schedule(opt, args.epochs, steps)
    step = 0
    bar = tqdm(range(args.epochs), desc=desc, mininterval=5.0)
    for _ in bar:
        model.train()
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        for k in range(steps):
            loss = loss_of(order[k * args.batch:(k + 1) * args.batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return step


def train_cls(args, cfg, g: torch.Generator) -> tuple[dict, dict]:
    """Whole-image fractal classification → (backbone state without the head, metrics)."""
    import backbones
    from datasets.base import resize_uint8
    from datasets.synthetic.fractals import fractal_dataset

    t0 = time.perf_counter()
    imgs, labels = fractal_dataset(args.classes, args.per_class, 64, args.seed)
    x_all = resize_uint8(torch.from_numpy(imgs)[:, None], int(cfg.img_size)).expand(-1, 3, -1, -1).contiguous()
    y_all = torch.from_numpy(labels).long()
    log.info("generated %d fractal images (%d classes) in %.0fs", len(y_all), args.classes, time.perf_counter() - t0)
    val_idx, tr_idx = _split(len(y_all), g)
    mean = torch.tensor(list(cfg.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.std)).view(1, 3, 1, 1)

    model = backbones.build(cfg, num_classes=args.classes, drop_path=0.1)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def loss_of(idx):
        x = augment(x_all[idx].float() / 255.0, g)
        x = ((colourise(x, g) if args.colour else x) - mean) / std
        return loss_fn(model(x), y_all[idx])

    step = fit(model, list(model.parameters()), loss_of, tr_idx, args, g, f"pretrain {args.backbone}")
    model.eval()
    gv = torch.Generator().manual_seed(args.seed + 1)  # held-out colours: fixed, apart from the training draws
    with torch.no_grad():
        correct = 0
        for i in val_idx.split(512):
            x = x_all[i].float() / 255.0
            x = (colourise(x, gv) if args.colour else x) - mean
            correct += (model(x / std).argmax(-1) == y_all[i]).sum().item()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    return state, {"steps": step, "heldout_top1": 100.0 * correct / len(val_idx),
                   "generator": {"kind": "FractalDB-style IFS", "classes": args.classes, "per_class": args.per_class,
                                 "render_size": 64, "image_size": int(cfg.img_size), "seed": args.seed},
                   "augment": "pad-4 crop + hflip" + (" + random colours" if args.colour else "")}


class SegProbe(torch.nn.Module):
    """A 1×1 classifier per dense stage map, upsampled to the finest map's grid and summed: the pretext's only
    decoder, so the backbone's stage maps must carry the per-pixel classes themselves. The labels are taken at
    that grid (every ``stride``-th pixel): full-resolution logits over 101 classes cost 5× the backbone."""

    def __init__(self, channels, classes: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Conv2d(c, classes, 1) for c in channels)

    def forward(self, feats, size):
        import torch.nn.functional as F

        return sum(F.interpolate(h(f), size=size, mode="bilinear", align_corners=False)
                   for h, f in zip(self.heads, feats))


def train_seg(args, cfg, g: torch.Generator) -> tuple[dict, dict]:
    """Per-pixel fractal-category segmentation of fractal scenes through Swin-Det → (timm-layout state, metrics)."""
    from backbones.swin_det import build_swin_det
    from bench.dense_metrics import SegConfusion
    from datasets.synthetic.fractal_scenes import fractal_scenes

    t0 = time.perf_counter()
    imgs, labels = fractal_scenes(args.scenes, args.classes, args.seed, size=args.scene_size,
                                  per_class=args.per_class)
    x_all = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels).long()
    log.info("generated %d fractal scenes (%d classes) in %.0fs", len(x_all), args.classes, time.perf_counter() - t0)
    val_idx, tr_idx = _split(len(x_all), g)
    mean = torch.tensor(list(cfg.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.std)).view(1, 3, 1, 1)
    n_cls = args.classes + 1
    model = build_swin_det(cfg, drop_path=0.1)
    probe = SegProbe(model.out_channels, n_cls)
    r = int(model.out_strides[0])
    cells = slice(r // 2, None, r)  # the label at each cell centre of the finest map (after the flip)
    loss_fn = torch.nn.CrossEntropyLoss()

    def loss_of(idx):
        x, y = x_all[idx].float() / 255.0, y_all[idx]
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        y = torch.where(flip[:, None, None], y.flip(2), y)[:, cells, cells]
        return loss_fn(probe(model.forward_features((x - mean) / std), y.shape[-2:]), y)

    params = list(model.parameters()) + list(probe.parameters())
    step = fit(model, params, loss_of, tr_idx, args, g, f"pretrain {args.backbone} (seg)")
    model.eval()
    conf, fg = SegConfusion(n_cls), SegConfusion(2)
    with torch.no_grad():
        for i in val_idx.split(256):
            y = y_all[i][:, cells, cells]
            pred = probe(model.forward_features((x_all[i].float() / 255.0 - mean) / std), y.shape[-2:]).argmax(1)
            conf.update(pred, y)
            fg.update(pred > 0, y > 0)
    sc, fgs = conf.scores(), fg.scores()
    last = model.out_indices[-1]
    state = {k: v for k, v in model.state_dict().items()
             if not (k.startswith("norm") and k[4:5].isdigit()) and "attn_mask" not in k}
    state.update({f"norm.{n}": v for n, v in getattr(model, f"norm{last}").state_dict().items()})
    return state, {"steps": step, "heldout_pixel_acc": sc["aacc"], "heldout_miou": sc["miou"],
                   "heldout_fg_miou": fgs["miou"],  # fractal vs background
                   "generator": {"kind": "formula-driven segmentation scenes (coloured FractalDB-style IFS)",
                                 "classes": args.classes, "per_class": args.per_class, "scenes": args.scenes,
                                 "render_size": 32, "image_size": args.scene_size, "seed": args.seed},
                   "augment": "hflip"}


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_suite()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{args.backbone}.yaml")
    cfg.checkpoint = None
    t0, c0 = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(args.seed)
    state, res = (train_seg if args.task == "seg" else train_cls)(args, cfg, g)
    seconds = time.perf_counter() - t0

    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(args.out)
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    meta = {
        "backbone": args.backbone, "task": args.task, "file": args.out.name, "sha256": sha, "dtype": "float16",
        "generator": res.pop("generator"),
        "training": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
                     "label_smoothing": 0.1 if args.task == "cls" else 0.0, "drop_path": 0.1,
                     "augment": res.pop("augment"), "threads": args.threads, "steps": res.pop("steps"),
                     "torch": torch.__version__},
        **res, "seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - c0, 1),
    }
    write_json_atomic(args.out.with_suffix(".json"), meta)
    scores = ", ".join(f"{k} {v:.2f}" for k, v in res.items())
    print(f"pretrained {args.backbone} ({args.task}): {scores} in {seconds:.0f}s -> {args.out} (sha256 {sha[:12]})")
    return meta


if __name__ == "__main__":
    main()
