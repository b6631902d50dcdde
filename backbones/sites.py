"""A uniform view of where PETL methods attach, so methods never hard-code module paths.

Families: ``vit`` (timm ViT, one list of blocks), ``swin`` (every block of every stage, in order;
``layers.i.blocks.j``), ``convnext`` (``stages.i.blocks.j``), and for video ``video_vit`` (VideoMAE's
ViT: timm blocks, no class token) and ``video_swin`` (torchvision's Swin3d: ``features.{2i}.{j}``, MLP
linears ``mlp.0``/``mlp.3``). Methods opt in to a family by listing it in ``Method.families``. A site a family lacks (qkv/proj/norm1/
num_heads on ConvNeXt, the ``tokens`` extension on Swin and ConvNeXt, ...) raises ``MethodNotDefinedError``
naming the method (set by ``Sites.require``) and the family. ``BlockSites.dim`` is the block's own width.

``sites(model)`` returns a ``Sites`` object: the list of blocks, and in each block the attention
``qkv``/``proj`` linears, the MLP ``fc1``/``fc2`` linears, the two norms, a way to replace a linear
(``set_linear``), and block extension points (``extend``: sequential/parallel branch wrappers,
token insertion, residual-stream ops; see ``backbones.blocks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from backbones.blocks import EXTENSION_KEYS, add_extension

LINEAR_SITES = ("qkv", "proj", "fc1", "fc2")
_LINEAR_PATHS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}
# torchvision's Swin blocks (video_swin) keep their MLP as a Sequential: Linear, GELU, Dropout, Linear, Dropout
_FAMILY_PATHS = {"video_swin": {**_LINEAR_PATHS, "fc1": ("mlp", "0"), "fc2": ("mlp", "3")}}


class MethodNotDefinedError(NotImplementedError):
    pass


@dataclass
class BlockSites:
    index: int
    block: nn.Module
    prefix: str  # state-dict prefix of the block, e.g. "blocks.3"
    family: str = "vit"
    method: str = "?"  # the method asking (set by Sites.require), for error messages

    def _lacks(self, site: str, has: str):
        return MethodNotDefinedError(
            f"method '{self.method}' needs the {site}, which backbone family '{self.family}' does not have "
            f"(it has: {has})"
        )

    def linear(self, name: str) -> nn.Module:
        parent, attr = self._parent(name)
        return getattr(parent, attr)

    def set_linear(self, name: str, module: nn.Module) -> None:
        parent, attr = self._parent(name)
        setattr(parent, attr, module)

    def linears(self) -> dict[str, nn.Module]:
        """The linears this family has (ConvNeXt: fc1, fc2 only)."""
        return {n: self.linear(n) for n in self.linear_names}

    def linear_path(self, name: str) -> str:
        return f"{self.prefix}.{'.'.join(_FAMILY_PATHS.get(self.family, _LINEAR_PATHS)[name])}"

    @property
    def linear_names(self) -> tuple[str, ...]:
        return LINEAR_SITES if self.family != "convnext" else ("fc1", "fc2")

    @property
    def norm1(self) -> nn.Module:
        if self.family == "convnext":
            raise self._lacks("norm1 (the norm in front of attention)", "norm2 = the block's norm before its MLP")
        return self.block.norm1

    @property
    def norm2(self) -> nn.Module:
        """The norm in front of the MLP (ConvNeXt: its only norm, after the depthwise conv)."""
        return self.block.norm if self.family == "convnext" else self.block.norm2

    @property
    def dim(self) -> int:
        return self.norm2.normalized_shape[0]

    @property
    def num_heads(self) -> int:
        if self.family == "convnext":
            raise self._lacks("attention heads", "no attention")
        return self.block.attn.num_heads

    @property
    def extension_keys(self) -> tuple[str, ...]:
        return getattr(self.block, "extension_keys", EXTENSION_KEYS)

    def extend(self, key: str, module: nn.Module) -> nn.Module:
        """Attach ``module`` at extension point ``key`` of this block (see backbones.blocks)."""
        if key in EXTENSION_KEYS and key not in self.extension_keys:
            raise self._lacks(f"block extension point '{key}'", ", ".join(self.extension_keys))
        return add_extension(self.block, key, module)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        if name not in _LINEAR_PATHS:
            raise KeyError(f"unknown linear site '{name}'; known: {', '.join(LINEAR_SITES)}")
        if name not in self.linear_names:
            raise self._lacks(f"'{name}' linear", ", ".join(self.linear_names))
        first, attr = _FAMILY_PATHS.get(self.family, _LINEAR_PATHS)[name]
        return getattr(self.block, first), attr


@dataclass
class Sites:
    family: str
    model: nn.Module
    blocks: list[BlockSites]
    embed_dim: int
    num_prefix_tokens: int

    def __iter__(self) -> Iterator[BlockSites]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def final_norm(self) -> nn.Module:
        """The norm after the last block (ConvNeXt: ``head.norm``, after pooling; part of the backbone)."""
        return self.model.head.norm if self.family == "convnext" else self.model.norm

    @property
    def patch_embed(self) -> nn.Module:
        """The patch embedding (ConvNeXt: its 4x4 ``stem``)."""
        return self.model.stem if self.family == "convnext" else self.model.patch_embed

    def require(self, method: str, families: tuple[str, ...]) -> "Sites":
        if self.family not in families:
            raise MethodNotDefinedError(
                f"method '{method}' is not defined for backbone family '{self.family}' "
                f"(defined for: {', '.join(families)})"
            )
        for b in self.blocks:
            b.method = method
        return self


def sites(model: nn.Module) -> Sites:
    family = getattr(model, "petl_family", None)
    if family in ("vit", "video_vit"):
        blocks = [BlockSites(i, b, f"blocks.{i}", family) for i, b in enumerate(model.blocks)]
        return Sites(family, model, blocks, model.embed_dim, model.num_prefix_tokens)
    if family == "video_swin":  # torchvision: features.{2i} = stage i's blocks, features.{2i+1} = its merging
        paths = [(f"features.{2 * i}.{j}", b) for i, st in enumerate(model.features[0::2]) for j, b in enumerate(st)]
        blocks = [BlockSites(n, b, p, family) for n, (p, b) in enumerate(paths)]
        return Sites(family, model, blocks, blocks[0].dim, 0)
    if family in ("swin", "convnext"):
        stages = model.layers if family == "swin" else model.stages
        top = "layers" if family == "swin" else "stages"
        paths = [(f"{top}.{i}.blocks.{j}", b) for i, st in enumerate(stages) for j, b in enumerate(st.blocks)]
        blocks = [BlockSites(n, b, p, family) for n, (p, b) in enumerate(paths)]
        return Sites(family, model, blocks, blocks[0].dim, 0)
    raise MethodNotDefinedError(
        f"no PETL sites for model {type(model).__name__} (family {family!r}); build it with backbones.build"
    )
