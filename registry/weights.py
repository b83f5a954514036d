"""WeightMapping: checkpoint tensor name → (parameter name, shard) for one architecture.

Parameter names stay close to the checkpoint's; the mapping only declares the fused projections
(q/k/v → qkv_proj, gate/up → gate_up_proj) and names to ignore. Tied embeddings need no entry: a
parameter that aliases another (lm_head sharing embed_tokens) accepts its checkpoint tensor, if
present, without requiring it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class FusedPart:
    """Checkpoint module `part` is shard `shard` (along dim 0) of fused module `fused`."""

    part: str
    fused: str
    shard: int


@dataclass(frozen=True)
class WeightMapping:
    fused: tuple[FusedPart, ...] = ()
    # Regexes (re.search) of checkpoint names that carry nothing we load, e.g. rotary inv_freq buffers.
    ignore: tuple[str, ...] = ()

    def map(self, name: str) -> tuple[str, int | None] | None:
        """(parameter name, shard index or None), or None when the tensor is to be ignored."""
        if any(re.search(pattern, name) for pattern in self.ignore):
            return None
        for part in self.fused:
            mapped = _replace_module(name, part.part, part.fused)
            if mapped is not None:
                return mapped, part.shard
        return name, None

    def checkpoint_name(self, param_name: str, shard: int | None) -> str:
        """The checkpoint tensor that fills (param_name, shard): the inverse of `map`, for messages."""
        if shard is not None:
            for part in self.fused:
                if part.shard == shard:
                    mapped = _replace_module(param_name, part.fused, part.part)
                    if mapped is not None:
                        return mapped
        return param_name


def _replace_module(name: str, old: str, new: str) -> str | None:
    """`name` with its first path component `old` replaced by `new` (whole components only, so
    `q_proj` never matches inside `qq_proj`), or None when `old` is not a component."""
    parts = name.split(".")
    for i, component in enumerate(parts[:-1]):  # the last component is the tensor (weight, bias)
        if component == old:
            return ".".join(parts[:i] + [new] + parts[i + 1 :])
    return None


LLAMA_STYLE_MAPPING = WeightMapping(
    fused=(
        FusedPart("q_proj", "qkv_proj", 0),
        FusedPart("k_proj", "qkv_proj", 1),
        FusedPart("v_proj", "qkv_proj", 2),
        FusedPart("gate_proj", "gate_up_proj", 0),
        FusedPart("up_proj", "gate_up_proj", 1),
    ),
    ignore=(r"rotary_emb\.inv_freq$", r"\.rotary_emb\."),
)
