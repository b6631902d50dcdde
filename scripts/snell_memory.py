"""Peak CPU memory of one training step, SNELL vs LoRA, on ViT-B/16 (random weights).

Each configuration runs in a fresh subprocess: build vit_b16 + method + AdamW, read VmRSS, reset the
peak (``/proc/self/clear_refs`` 5), run ``--steps`` train steps (forward, backward, AdamW step) at
``--batch``, read VmHWM. Reported: peak − baseline (MiB), i.e. activations + gradients + optimizer
state + transient buffers of the step. Usage:

    python scripts/snell_memory.py --batch 4 snell:rank=32,sparsity=0.9 lora
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(spec: str, batch: int, steps: int, threads: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from omegaconf import OmegaConf

    torch.set_num_threads(threads)
    from bench.imports import import_suite

    import_suite()
    import backbones
    import methods
    from bench import CONF_DIR

    name, _, over = spec.partition(":")
    cfg = OmegaConf.load(Path(CONF_DIR) / "method" / f"{name}.yaml")
    import yaml

    for kv in filter(None, over.split(",")):
        k, v = kv.split("=")
        cfg[k] = yaml.safe_load(v)
    torch.manual_seed(0)
    bcfg = OmegaConf.load(Path(CONF_DIR) / "backbone" / "vit_b16.yaml")
    bcfg.checkpoint = None
    model = backbones.build(bcfg, num_classes=100)
    m = methods.build(cfg)
    m.apply(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 100, (batch,))
    base = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    peak = _status("VmHWM")
    return {"spec": spec, "batch": batch, "steps": steps, "baseline_mib": base / 2**20,
            "peak_delta_mib": (peak - base) / 2**20}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="+", help="method[:key=value,...]")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.specs[0], a.batch, a.steps, a.threads)))
        return
    for spec in a.specs:
        out = subprocess.run([sys.executable, __file__, "--child", spec, "--batch", str(a.batch),
                              "--steps", str(a.steps), "--threads", str(a.threads)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
