"""Shared building blocks: low-rank linear deltas, bottleneck adapters, prompts, scale-shift."""
from methods.blocks.adapter import Bottleneck, ParallelAdapter, SequentialAdapter
from methods.blocks.lora import DeltaLinear, LowRank, qkv_slices
from methods.blocks.merge import merge_wrappers
from methods.blocks.prompts import InsertPrompts, Prompts, ReplacePrompts
from methods.blocks.scale_shift import ScaleShift, ScaleShiftAfter

__all__ = [
    "Bottleneck",
    "ParallelAdapter",
    "SequentialAdapter",
    "DeltaLinear",
    "LowRank",
    "qkv_slices",
    "merge_wrappers",
    "Prompts",
    "InsertPrompts",
    "ReplacePrompts",
    "ScaleShift",
    "ScaleShiftAfter",
]
