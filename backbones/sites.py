"""A uniform view of where PETL methods attach, so methods never hard-code module paths.

``sites(model)`` returns a ``Sites`` object: the list of blocks, and in each block the attention
``qkv``/``proj`` linears, the MLP ``fc1``/``fc2`` linears, the two norms, a way to replace a linear
(``set_linear``), and block extension points (``extend``: sequential/parallel branch wrappers,
token insertion, residual-stream ops; see ``backbones.blocks``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from torch import nn

from backbones.blocks import add_extension

LINEAR_SITES = ("qkv", "proj", "fc1", "fc2")
_LINEAR_PATHS = {"qkv": ("attn", "qkv"), "proj": ("attn", "proj"), "fc1": ("mlp", "fc1"), "fc2": ("mlp", "fc2")}


class MethodNotDefinedError(NotImplementedError):
    pass


@dataclass
class BlockSites:
    index: int
    block: nn.Module
    prefix: str  # state-dict prefix of the block, e.g. "blocks.3"

    def linear(self, name: str) -> nn.Module:
        parent, attr = self._parent(name)
        return getattr(parent, attr)

    def set_linear(self, name: str, module: nn.Module) -> None:
        parent, attr = self._parent(name)
        setattr(parent, attr, module)

    def linears(self) -> dict[str, nn.Module]:
        return {n: self.linear(n) for n in LINEAR_SITES}

    def linear_path(self, name: str) -> str:
        return f"{self.prefix}.{'.'.join(_LINEAR_PATHS[name])}"

    @property
    def norm1(self) -> nn.Module:
        return self.block.norm1

    @property
    def norm2(self) -> nn.Module:
        return self.block.norm2

    @property
    def dim(self) -> int:
        return self.block.norm1.normalized_shape[0]

    @property
    def num_heads(self) -> int:
        return self.block.attn.num_heads

    def extend(self, key: str, module: nn.Module) -> nn.Module:
        """Attach ``module`` at extension point ``key`` of this block (see backbones.blocks)."""
        return add_extension(self.block, key, module)

    def _parent(self, name: str) -> tuple[nn.Module, str]:
        if name not in _LINEAR_PATHS:
            raise KeyError(f"unknown linear site '{name}'; known: {', '.join(LINEAR_SITES)}")
        first, attr = _LINEAR_PATHS[name]
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
        return self.model.norm

    @property
    def patch_embed(self) -> nn.Module:
        return self.model.patch_embed

    def require(self, method: str, families: tuple[str, ...]) -> "Sites":
        if self.family not in families:
            raise MethodNotDefinedError(
                f"method '{method}' is not defined for backbone family '{self.family}' "
                f"(defined for: {', '.join(families)})"
            )
        return self


def sites(model: nn.Module) -> Sites:
    family = getattr(model, "petl_family", None)
    if family == "vit":
        blocks = [BlockSites(i, b, f"blocks.{i}") for i, b in enumerate(model.blocks)]
        return Sites("vit", model, blocks, model.embed_dim, model.num_prefix_tokens)
    raise MethodNotDefinedError(
        f"no PETL sites for model {type(model).__name__} (family {family!r}); build it with backbones.build"
    )
