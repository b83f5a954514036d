"""WeightMapping: checkpoint tensor name → where it goes in a module (parameter, expert, shard).

Every architecture declares its mapping on its network class (`weight_mapping`, the
`packed_modules_mapping` idiom); this module only holds the type. Parameter names stay close to the
checkpoint's; a mapping declares

- fused projections: checkpoint modules that are row shards of one parameter (q/k/v → qkv_proj,
  gate/up → gate_up_proj), `FusedPart`;
- stacked experts: per-expert checkpoint modules (`...experts.7.gate_proj.weight`) that fill slice
  [7] — and optionally a row shard of it — of one parameter stacked over experts
  (`...experts.gate_up_proj` of shape [num_experts, 2 * intermediate, hidden]), `ExpertPart`;
- names to ignore (rotary inv_freq buffers).

Tied embeddings need no entry: a parameter that aliases another (lm_head sharing embed_tokens)
accepts its checkpoint tensor, if present, without requiring it.

Which rows a shard covers is declared by the module that owns the parameter: `shard_sizes` (a
tuple; every parameter of the module is split along dim 0, as `FusedLinear` does) or
`expert_shard_sizes` (a dict: stacked parameter name → shard sizes along dim 1, or None when the
per-expert tensor fills the whole slice). A parameter named in `expert_shard_sizes` is stacked over
experts along dim 0. A checkpoint tensor mapped to such a parameter without a shard (or without an
expert) fills every shard (or expert) at once: checkpoints that already fuse qkv_proj/gate_up_proj
(Phi-3) or store experts stacked load with the same network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple


class WeightTarget(NamedTuple):
    """Where one checkpoint tensor goes: `param[expert]` (when stacked), rows of shard `shard`."""

    param: str
    shard: int | None = None
    expert: int | None = None

    def describe(self) -> str:
        text = self.param
        if self.expert is not None:
            text += f"[expert {self.expert}]"
        if self.shard is not None:
            text += f"[shard {self.shard}]"
        return text


@dataclass(frozen=True)
class FusedPart:
    """Checkpoint module `part` is shard `shard` (along dim 0) of fused module `fused`."""

    part: str
    fused: str
    shard: int


@dataclass(frozen=True)
class ExpertPart:
    """`<prefix>.<experts>.<E>.<part>.weight` fills `<prefix>.<experts>.<stacked>[E]` (shard `shard`
    of it along its first dim when set). A tensor suffix other than `weight` (e.g. `bias`) goes to
    `<stacked>_<suffix>`.

    Qwen-MoE: ExpertPart("experts", "gate_proj", "gate_up_proj", 0); Mixtral:
    ExpertPart("experts", "w1", "gate_up_proj", 0), ExpertPart("experts", "w2", "down_proj").
    """

    experts: str
    part: str
    stacked: str
    shard: int | None = None


@dataclass(frozen=True)
class WeightMapping:
    fused: tuple[FusedPart, ...] = ()
    experts: tuple[ExpertPart, ...] = ()
    # Regexes (re.search) of checkpoint names that carry nothing we load, e.g. rotary inv_freq buffers.
    ignore: tuple[str, ...] = ()

    def map(self, name: str) -> WeightTarget | None:
        """Where checkpoint tensor `name` goes, or None when it is to be ignored."""
        if any(re.search(pattern, name) for pattern in self.ignore):
            return None
        for part in self.experts:
            target = _map_expert(name, part)
            if target is not None:
                return target
        for fused in self.fused:
            mapped = _replace_module(name, fused.part, fused.fused)
            if mapped is not None:
                return WeightTarget(mapped, fused.shard)
        return WeightTarget(name)

    def checkpoint_name(self, target: WeightTarget) -> str:
        """The checkpoint tensor that fills `target`: the inverse of `map`, for messages (a missing
        expert is named as the checkpoint names it, e.g. `...experts.7.gate_proj.weight`)."""
        if target.expert is not None:
            for part in self.experts:
                name = _expert_checkpoint_name(target, part)
                if name is not None:
                    return name
            return target.describe()
        if target.shard is not None:
            for fused in self.fused:
                if fused.shard == target.shard:
                    mapped = _replace_module(target.param, fused.fused, fused.part)
                    if mapped is not None:
                        return mapped
        return target.param


def _map_expert(name: str, part: ExpertPart) -> WeightTarget | None:
    """`...<experts>.<E>.<part>.<suffix>` → (`...<experts>.<stacked>[_suffix]`, shard, E)."""
    parts = name.split(".")
    # [..., experts, E, part, suffix]: the expert index and the part are the last two modules.
    if len(parts) < 4 or parts[-2] != part.part or not parts[-3].isdigit():
        return None
    if ".".join(parts[-4 - part.experts.count(".") : -3]) != part.experts:
        return None
    suffix = parts[-1]
    leaf = part.stacked if suffix == "weight" else f"{part.stacked}_{suffix}"
    return WeightTarget(".".join(parts[:-3] + [leaf]), part.shard, int(parts[-3]))


def _expert_checkpoint_name(target: WeightTarget, part: ExpertPart) -> str | None:
    prefix, _, leaf = target.param.rpartition(".")
    if part.shard != target.shard or not (prefix == part.experts or prefix.endswith("." + part.experts)):
        return None
    if leaf == part.stacked:
        suffix = "weight"
    elif leaf.startswith(part.stacked + "_"):
        suffix = leaf[len(part.stacked) + 1 :]
    else:
        return None
    return f"{prefix}.{target.expert}.{part.part}.{suffix}"


def _replace_module(name: str, old: str, new: str) -> str | None:
    """`name` with its first path component `old` replaced by `new` (whole components only, so
    `q_proj` never matches inside `qq_proj`), or None when `old` is not a component."""
    parts = name.split(".")
    for i, component in enumerate(parts[:-1]):  # the last component is the tensor (weight, bias)
        if component == old:
            return ".".join(parts[:i] + [new] + parts[i + 1 :])
    return None
