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
    python -m tools.pretrain_micro --backbone swin_micro --epochs 45 --lr 2e-3 --threads 1   # the shipped swin_micro
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


def main(argv=None) -> dict:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import_suite()
    import backbones
    from bench.optim import build_scheduler
    from datasets.base import resize_uint8
    from datasets.synthetic.fractals import fractal_dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = OmegaConf.load(CONF_DIR / "backbone" / f"{args.backbone}.yaml")
    cfg.checkpoint = None
    t0, c0 = time.perf_counter(), time.process_time()
    imgs, labels = fractal_dataset(args.classes, args.per_class, 64, args.seed)
    x_all = resize_uint8(torch.from_numpy(imgs)[:, None], int(cfg.img_size)).expand(-1, 3, -1, -1).contiguous()
    y_all = torch.from_numpy(labels).long()
    log.info("generated %d fractal images (%d classes) in %.0fs", len(y_all), args.classes, time.perf_counter() - t0)
    # hold out 10 % per class to report pretraining accuracy
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(y_all), generator=g)
    n_val = len(y_all) // 10
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    mean = torch.tensor(list(cfg.mean)).view(1, 3, 1, 1)
    std = torch.tensor(list(cfg.std)).view(1, 3, 1, 1)

    model = backbones.build(cfg, num_classes=args.classes, drop_path=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps = (len(tr_idx) + args.batch - 1) // args.batch
    sched = build_scheduler(opt, OmegaConf.create({"epochs": args.epochs, "warmup_epochs": 2, "min_lr": 1e-5,
                                                   "warmup_lr": 1e-6}), steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    step = 0
    bar = tqdm(range(args.epochs), desc=f"pretrain {args.backbone}", mininterval=5.0)
    for _ in bar:
        model.train()
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        for k in range(steps):
            idx = order[k * args.batch:(k + 1) * args.batch]
            x = augment(x_all[idx].float() / 255.0, g)
            x = ((colourise(x, g) if args.colour else x) - mean) / std
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    gv = torch.Generator().manual_seed(args.seed + 1)  # held-out colours: fixed, apart from the training draws
    with torch.no_grad():
        correct = 0
        for i in val_idx.split(512):
            x = x_all[i].float() / 255.0
            x = (colourise(x, gv) if args.colour else x) - mean
            correct += (model(x / std).argmax(-1) == y_all[i]).sum().item()
    acc = 100.0 * correct / n_val
    seconds = time.perf_counter() - t0

    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.startswith("head.")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(args.out)
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    meta = {
        "backbone": args.backbone, "file": args.out.name, "sha256": sha, "dtype": "float16",
        "generator": {"kind": "FractalDB-style IFS", "classes": args.classes, "per_class": args.per_class,
                      "render_size": 64, "image_size": int(cfg.img_size), "seed": args.seed},
        "training": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "weight_decay": args.weight_decay,
                     "label_smoothing": 0.1, "drop_path": 0.1, "augment": "pad-4 crop + hflip" + (" + random colours" if args.colour else ""), "threads": args.threads,
                     "steps": step, "torch": torch.__version__},
        "heldout_top1": acc, "seconds": round(seconds, 1), "cpu_seconds": round(time.process_time() - c0, 1),
    }
    write_json_atomic(args.out.with_suffix(".json"), meta)
    print(f"pretrained {args.backbone}: held-out top1 {acc:.2f}% in {seconds:.0f}s -> {args.out} (sha256 {sha[:12]})")
    return meta


if __name__ == "__main__":
    main()
