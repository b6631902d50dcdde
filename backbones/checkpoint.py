"""Loading user-downloaded checkpoints into a backbone, with errors that say what does not fit.

The file format is detected from the file's bytes, not its name:

* ``npz``: a zip of ``.npy`` arrays, the Google JAX/Flax ViT release (``ViT-B_16.npz`` etc.). It is read by
  timm's own ``vision_transformer._load_weights`` into a *twin* ViT whose shape is read off the arrays
  (width, depth, heads, MLP width, patch, token grid), so every array lands where timm puts it; the twin's
  state dict is then fitted into the model like any other. Arrays the loader never touches (the 21k
  ``head``, ``pre_logits``) are ignored, as in timm and the anchors.
* ``torch``: a ``torch.save`` file (zip or legacy pickle, any suffix: ``.pth``, ``.pth.tar``, ``.bin``).
* ``safetensors``: 8-byte header length then a JSON header.

Containers are unwrapped (``model`` as MAE/Swin/ConvNeXt ship them, ``state_dict`` as MoCo v3 does,
``module``) and a DDP ``module.`` prefix is stripped. Then a family-specific ``prepare`` step and timm's
own key converter (``checkpoint_filter_fn`` of the family's timm module) map the official key names to
timm's; ``fit_state_dict`` copies the result and fails with one error listing missing keys, unexpected
keys and differing shapes.
"""
from __future__ import annotations

import logging
import math
import re
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    pass


COMMON_KEYS = ("name", "family", "img_size", "mean", "std", "checkpoint", "method_defaults")


def check_keys(cfg, args: tuple[str, ...]) -> None:
    """Fail on backbone config keys the family does not use (e.g. ViT's ``depth`` on a Swin)."""
    unknown = [k for k in cfg if k not in COMMON_KEYS and k not in args]
    if unknown:
        raise ValueError(f"backbone '{cfg.get('name')}' (family {cfg.get('family')}) does not use key(s) "
                         f"{', '.join(unknown)}; its keys: {', '.join(dict.fromkeys(COMMON_KEYS + tuple(args)))}")


# -- file formats -----------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """'npz', 'torch' or 'safetensors', from the file's content (names lie: MoCo ships ``.pth.tar``)."""
    path = _existing(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        return "torch"  # torch.save's zip container (data.pkl + storages)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    return "torch"  # legacy pickle (or something torch.load will refuse, with its own message)


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (set backbone.checkpoint=PATH to a downloaded file)")
    return path


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from a torch or safetensors file (see ``detect_format``).

    Unwraps the usual containers (``model``, ``state_dict``, ``module``) and strips ``module.`` prefixes.
    """
    path = _existing(path)
    fmt = detect_format(path)
    if fmt == "npz":
        raise CheckpointError(f"checkpoint {path} is a JAX .npz archive; it loads only into a ViT backbone")
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items() if torch.is_tensor(v)}


def read_npz_vit(path: str | Path) -> StateDict:
    """A Google ``.npz`` ViT checkpoint as a timm ViT state dict, via timm's ``_load_weights``.

    The twin ViT is built on the meta device with the checkpoint's own shape, materialised empty and
    filled with NaN; tensors still NaN after timm's loader are reported (the file lacks them).
    """
    import numpy as np
    from timm.models.vision_transformer import VisionTransformer, _load_weights

    path = _existing(path)
    with np.load(path, allow_pickle=False) as w:  # lazy: only the arrays named below are read here
        files = set(w.files)
        pre = next((p for p in ("", "opt/target/", "params/") if f"{p}embedding/kernel" in files), None)
        if pre is None:
            raise CheckpointError(f"checkpoint {path}: .npz without 'embedding/kernel'; not a Google ViT checkpoint")
        b0 = f"{pre}Transformer/encoderblock_0/"
        try:
            ph, pw, _, dim = w[f"{pre}embedding/kernel"].shape
            _, heads, _ = w[f"{b0}MultiHeadDotProductAttention_1/query/kernel"].shape
            hidden = w[f"{b0}MlpBlock_3/Dense_0/kernel"].shape[1]
            tokens = w[f"{pre}Transformer/posembed_input/pos_embedding"].shape[1]
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path}: .npz lacks {e}; expected the original Google ViT layout "
                                  f"(Transformer/encoderblock_i/...)") from None
    blocks = {int(m.group(1)) for k in files if (m := re.match(rf"{re.escape(pre)}Transformer/encoderblock_(\d+)/", k))}
    cls = f"{pre}cls" in files
    grid = int(round(math.sqrt(tokens - int(cls))))
    twin = VisionTransformer(
        img_size=grid * ph, patch_size=ph, embed_dim=dim, depth=len(blocks), num_heads=heads,
        mlp_ratio=hidden / dim, qkv_bias=f"{b0}MultiHeadDotProductAttention_1/query/bias" in files,
        class_token=cls, global_pool="token" if cls else "avg", num_classes=0, device="meta",
    )
    twin = twin.to_empty(device="cpu")
    with torch.no_grad():
        for p in twin.parameters():
            p.fill_(float("nan"))
        try:
            _load_weights(twin, str(path))
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path} with timm's npz loader: {type(e).__name__}: {e}") from None
    sd = twin.state_dict()
    untouched = [k for k, v in sd.items() if v.is_floating_point() and torch.isnan(v).all()]
    if untouched:
        raise CheckpointError(f"checkpoint {path}: the .npz does not provide {', '.join(untouched[:8])}")
    return sd


# -- naming layouts ---------------------------------------------------------------------------
def describe_layout(sd: StateDict) -> str:
    """A human name for the key layout of ``sd`` (after container/``module.`` unwrapping)."""
    keys = set(sd)
    if any(k.startswith("base_encoder.") for k in keys):
        return "MoCo v3 pre-training (base_encoder/momentum_encoder)"
    if any(k.startswith("decoder_") for k in keys) or "mask_token" in keys:
        return "MAE with decoder"
    if any(k.startswith("downsample_layers.") for k in keys):
        return "FB ConvNeXt"
    if any(k.endswith("relative_position_index") for k in keys) or "layers.0.downsample.reduction.weight" in keys:
        return "Microsoft Swin"
    if any(k.startswith("layers.") for k in keys):
        return "timm Swin"
    if any(k.startswith("stages.") for k in keys):
        return "timm ConvNeXt"
    if "cls_token" in keys or any(k.startswith("blocks.") for k in keys):
        return "timm/MAE/MoCo v3 ViT"
    return "unknown"


def prepare_vit(sd: StateDict) -> StateDict:
    """MoCo v3 pre-training files keep the encoder under ``base_encoder.`` (as MoCo's own
    ``convert_to_deit.py`` reads it); MAE files with the decoder carry ``decoder_*``/``mask_token``.
    Key names are otherwise timm's: MoCo v3's ``VisionTransformerMoCo`` and MAE's encoder subclass timm's
    VisionTransformer (MoCo's frozen sin-cos ``pos_embed`` is stored as a tensor and loads as is)."""
    if any(k.startswith("base_encoder.") for k in sd):
        sd = {k[len("base_encoder."):]: v for k, v in sd.items() if k.startswith("base_encoder.")}
    return {k: v for k, v in sd.items() if not (k.startswith("decoder_") or k == "mask_token")}


# -- fitting ----------------------------------------------------------------------------------
def fit_state_dict(
    model: nn.Module,
    sd: StateDict,
    source: str,
    backbone: str,
    skip: Callable[[str], bool] = lambda k: False,
    layout: str = "",
) -> None:
    """Copy ``sd`` into ``model``; every backbone tensor must be present with the right shape.

    ``skip(key)`` names model keys that a checkpoint need not provide (the task head, PETL modules).
    Raises one error listing missing keys, unexpected keys and differing shapes.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not skip(k)]
    unexpected = [k for k in sd if k not in own and not skip(k)]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in sd
        if k in own and not skip(k) and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        def show(xs):
            return ", ".join(xs[:8]) + (f", ... ({len(xs)} in all)" if len(xs) > 8 else "") if xs else "none"

        kind = f" (file layout: {layout})" if layout else ""
        raise CheckpointError(
            f"checkpoint {source}{kind} does not fit backbone '{backbone}': missing keys: {show(missing)}; "
            f"unexpected keys: {show(unexpected)}; shapes differ (checkpoint vs model): {show(shapes)}. "
            f"Pick the backbone config that matches the file (backbone=...)"
        )
    load = {k: v for k, v in sd.items() if k in own and not skip(k)}
    model.load_state_dict(load, strict=False)
    log.info("loaded %d tensors from %s", len(load), source)


def _petl_key(k: str) -> bool:
    return ".petl." in k or k.startswith("petl.")


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    backbone: str,
    filter_fn: Optional[Callable[[StateDict, nn.Module], StateDict]] = None,
    head_prefixes: tuple[str, ...] = ("head.",),
    prepare: Optional[Callable[[StateDict], StateDict]] = None,
    allow_npz: bool = False,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Load ``path`` into ``model`` (see the module docstring for the formats and the steps).

    ``prepare`` runs before timm's ``filter_fn``; ``head_prefixes`` are dropped from the file and not
    required from it (the task head stays at its initialisation); ``allow_npz`` for the ViT family;
    ``allow_missing``: model key prefixes the file may lack (new modules, e.g. Swin-Det's ``norm{i}``).
    """
    fmt = detect_format(path)
    if fmt == "npz":
        if not allow_npz:
            raise CheckpointError(f"checkpoint {path} is a Google JAX .npz (ViT) file; backbone '{backbone}' "
                                  f"needs its own official .pth (see conf/backbone/{backbone}.yaml)")
        sd, layout = read_npz_vit(path), "Google ViT .npz"
    else:
        sd = read_state_dict(path)
        layout = describe_layout(sd)
        if prepare is not None:
            sd = prepare(sd)
        if filter_fn is not None:
            try:
                sd = filter_fn(sd, model)
            except Exception as e:  # timm's converters index the model by the file's keys: a foreign file
                log.debug("timm filter failed on %s (%s: %s); fitting the raw keys", path, type(e).__name__, e)
    sd = {k: v for k, v in sd.items() if not k.startswith(head_prefixes)}
    fit_state_dict(model, sd, str(path), backbone, skip=lambda k: k.startswith(head_prefixes) or k.startswith(allow_missing) or _petl_key(k),
                   layout=layout)
