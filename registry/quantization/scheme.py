"""QuantScheme: a checkpoint's `quantization_config`, or a Load's `quantization` request, parsed once.

Every variant we cannot run exactly is refused here, before any tensor is read, with an
INVALID_ARGUMENT that names the config field (or the request field) and the supported values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, InvalidConfig

CHECKPOINT_METHODS = ("fp8", "compressed-tensors", "gptq", "awq", "gguf")
GGUF_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # what `import-gguf --keep-quant` keeps
LOAD_QUANTIZATIONS = ("", "int8", "int4", "fp8")
CT_FORMATS = ("pack-quantized", "float-quantized")
INT4_GROUP_SIZES = (128, 64, 32)  # on-the-fly int4: the first that divides the input size
_FIELD = "config.json: quantization_config"


@dataclass(frozen=True)
class QuantScheme:
    """How a model's linear layers are quantized.

    method: "gptq", "awq", "compressed-tensors", "fp8" (checkpoints) or "int8", "int4", "fp8-dynamic"
    (quantized while loading). `fmt` is the packing: "gptq" / "gptq_v2" (zeros stored minus one, or
    not), "awq-gemm", "pack-quantized", "float-quantized", "fp8-block", "fp8-tensor", or "dense" for
    on-the-fly schemes. `group_size` None = one scale per output channel (or tensor / block).
    """

    method: str
    fmt: str
    bits: int
    group_size: int | None = None
    symmetric: bool = True
    act_order: bool = False
    strategy: str = ""  # compressed-tensors: tensor / channel / group / block
    block: tuple[int, int] | None = None  # fp8 block-wise: (rows, columns) per scale
    tensor_types: tuple[tuple[str, str], ...] = ()  # gguf: (layer, block type) of every kept layer

    def gguf_type(self, layer: str) -> str | None:
        return dict(self.tensor_types).get(layer)

    @property
    def on_the_fly(self) -> bool:
        return self.fmt == "dense"

    @property
    def label(self) -> str:
        """ModelInfo.quantization: e.g. "gptq-int4-g128", "awq-int4-g128", "fp8-block128x128", "int8"."""
        if self.on_the_fly:
            return "fp8" if self.method == "fp8-dynamic" else self.method
        if self.method == "gguf":  # e.g. "gguf-q4_1", "gguf-q4_0+q8_0"
            return "gguf-" + "+".join(sorted({t.lower() for _, t in self.tensor_types}))
        if self.block is not None:
            detail = f"block{self.block[0]}x{self.block[1]}"
        elif self.group_size is not None:
            detail = f"g{self.group_size}"
        else:
            detail = self.strategy or "channel"
        kind = (
            "fp8"
            if self.bits == 8 and self.fmt in ("float-quantized", "fp8-block", "fp8-tensor")
            else (f"int{self.bits}")
        )
        name = self.method if self.method != "fp8" else ""
        parts = [p for p in (name, kind, detail) if p]
        if self.act_order:
            parts.append("act")
        if not self.symmetric:
            parts.append("asym")
        return "-".join(parts)


def scheme_for_load(
    quant_config: Any, requested: str, is_quant_model: bool, device_type: str, cuda_capability=None
) -> QuantScheme | None:
    """The scheme a Load runs with: the checkpoint's, or the requested on-the-fly one, or None.

    `quant_config` is config.json's `quantization_config` (None when absent)."""
    requested = (requested or "").strip().lower()
    if requested not in LOAD_QUANTIZATIONS:
        raise InvalidArgument(
            f"quantization {requested!r} is not supported (supported: {', '.join(repr(q) for q in LOAD_QUANTIZATIONS)})"
        )
    if quant_config is None:
        if is_quant_model:
            raise InvalidArgument(
                "is_quant_model is true but config.json has no quantization_config: the checkpoint is dense "
                "(use quantization = 'int8' / 'int4' to quantize it while loading)"
            )
        if not requested:
            return None
        if requested == "fp8":
            if device_type != "cuda" or cuda_capability is None or tuple(cuda_capability) < (8, 9):
                raise InvalidArgument(
                    "quantization 'fp8' needs a CUDA device of compute capability 8.9 or newer "
                    f"(this load runs on {device_type}); use 'int8' or 'int4'"
                )
            return QuantScheme("fp8-dynamic", "dense", 8)
        return QuantScheme(requested, "dense", 8 if requested == "int8" else 4, None, requested == "int8")
    scheme = parse_quantization_config(quant_config)
    if requested:
        raise InvalidArgument(
            f"quantization {requested!r} asks to quantize while loading, but the checkpoint is already "
            f"quantized ({scheme.label}); leave quantization empty"
        )
    return scheme


def parse_quantization_config(q: Any) -> QuantScheme:
    if not isinstance(q, dict):
        raise InvalidConfig(f"{_FIELD} must be an object")
    method = q.get("quant_method")
    if not isinstance(method, str) or method.lower() not in CHECKPOINT_METHODS:
        raise InvalidConfig(
            f"{_FIELD}.quant_method {method!r} is not supported (supported: {', '.join(CHECKPOINT_METHODS)})"
        )
    method = method.lower()
    if method == "gptq":
        return _parse_gptq(q)
    if method == "awq":
        return _parse_awq(q)
    if method == "fp8":
        return _parse_fp8(q)
    if method == "gguf":
        return _parse_gguf(q)
    return _parse_compressed_tensors(q)


def _choice(q: dict, name: str, allowed: tuple, default: Any, field: str = _FIELD) -> Any:
    value = q.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) and not all(isinstance(a, bool) for a in allowed):
        ok = False
    else:
        ok = value in allowed
    if not ok:
        raise InvalidConfig(
            f"{field}.{name} {value!r} is not supported (supported: {', '.join(repr(a) for a in allowed)})"
        )
    return value


def _group_size(q: dict, name: str, field: str = _FIELD) -> int | None:
    value = q.get(name, -1)
    if value is None or value == -1:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 8:
        raise InvalidConfig(f"{field}.{name} must be -1 or a positive multiple of 8, got {value!r}")
    return value


def _parse_gptq(q: dict) -> QuantScheme:
    bits = _choice(q, "bits", (4, 8), None)
    fmt = _choice(q, "checkpoint_format", ("gptq", "gptq_v2"), "gptq")
    dynamic = q.get("dynamic")
    if dynamic:
        raise InvalidConfig(f"{_FIELD}.dynamic (per-module overrides) is not supported")
    return QuantScheme(
        "gptq",
        fmt,
        bits,
        _group_size(q, "group_size"),
        symmetric=_choice(q, "sym", (True, False), True),
        act_order=_choice(q, "desc_act", (True, False), False),
    )


def _parse_awq(q: dict) -> QuantScheme:
    bits_field = "bits" if "bits" in q else "w_bit"
    bits = _choice(q, bits_field, (4,), None)
    version = q.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise InvalidConfig(f"{_FIELD}.version {version!r} is not supported (supported: 'gemm')")
    _choice(q, "zero_point", (True,), True)
    group_field = "group_size" if "group_size" in q else "q_group_size"
    return QuantScheme("awq", "awq-gemm", bits, _group_size(q, group_field), symmetric=False)


def _parse_fp8(q: dict) -> QuantScheme:
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise InvalidConfig(f"{_FIELD}.fmt {fmt!r} is not supported (supported: 'e4m3')")
    _choice(q, "activation_scheme", ("dynamic", "static"), "dynamic")
    block = q.get("weight_block_size")
    if block is None:
        return QuantScheme("fp8", "fp8-tensor", 8, strategy="tensor")
    if (
        not isinstance(block, list)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise InvalidConfig(
            f"{_FIELD}.weight_block_size must be [rows, columns] of positive integers, got {block!r}"
        )
    return QuantScheme("fp8", "fp8-block", 8, strategy="block", block=(block[0], block[1]))


def _parse_gguf(q: dict) -> QuantScheme:
    """Our own config, written by `import-gguf --keep-quant`: `tensor_types` maps every kept layer
    (e.g. model.layers.0.self_attn.q_proj) to its llama.cpp block type."""
    types = q.get("tensor_types")
    if not isinstance(types, dict) or not types:
        raise InvalidConfig(f"{_FIELD}.tensor_types must be a non-empty object (layer → block type)")
    for layer, block_type in types.items():
        if block_type not in GGUF_BLOCK_TYPES:
            raise InvalidConfig(
                f"{_FIELD}.tensor_types.{layer} {block_type!r} is not supported "
                f"(supported: {', '.join(GGUF_BLOCK_TYPES)})"
            )
    bits = 4 if any(t != "Q8_0" for t in types.values()) else 8
    return QuantScheme(
        "gguf", "gguf", bits, 32, symmetric=False, strategy="group", tensor_types=tuple(sorted(types.items()))
    )


def _parse_compressed_tensors(q: dict) -> QuantScheme:
    for name in ("sparsity_config", "kv_cache_scheme", "transform_config"):
        if q.get(name):
            raise InvalidConfig(f"{_FIELD}.{name} is not supported (weight quantization only)")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise InvalidConfig(f"{_FIELD}.config_groups must be a non-empty object")
    schemes = set()
    for group_name, group in groups.items():
        field = f"{_FIELD}.config_groups.{group_name}"
        if not isinstance(group, dict):
            raise InvalidConfig(f"{field} must be an object")
        fmt = group.get("format") or q.get("format")
        fmt_field = f"{field}.format" if group.get("format") else f"{_FIELD}.format"
        if fmt not in CT_FORMATS:
            raise InvalidConfig(
                f"{fmt_field} {fmt!r} is not supported (supported: {', '.join(CT_FORMATS)}; "
                "int-quantized W8A8 and sparse formats are not)"
            )
        schemes.add(_ct_weights(group, fmt, field))
    if len(schemes) > 1:
        raise InvalidConfig(
            f"{_FIELD}.config_groups use different weight schemes; one scheme for all is supported"
        )
    return schemes.pop()


def _ct_weights(group: dict, fmt: str, field: str) -> QuantScheme:
    w = group.get("weights")
    if not isinstance(w, dict):
        raise InvalidConfig(f"{field}.weights must be an object")
    wf = f"{field}.weights"
    kind = _choice(w, "type", ("int", "float") if fmt == "pack-quantized" else ("float",), None, wf)
    if fmt == "pack-quantized" and kind != "int":
        raise InvalidConfig(f"{wf}.type {kind!r} does not fit format pack-quantized (supported: 'int')")
    if w.get("dynamic"):
        raise InvalidConfig(f"{wf}.dynamic true is not supported (static weight scales only)")
    acts = group.get("input_activations")
    if isinstance(acts, dict) and acts.get("type") == "int":
        raise InvalidConfig(f"{field}.input_activations of type 'int' (W8A8) is not supported")
    symmetric = _choice(w, "symmetric", (True, False), True, wf)
    if fmt == "float-quantized":
        _choice(w, "num_bits", (8,), None, wf)
        strategy = _choice(w, "strategy", ("tensor", "channel", "block"), "tensor", wf)
        if not symmetric:
            raise InvalidConfig(f"{wf}.symmetric false is not supported for float-quantized weights")
        block = None
        if strategy == "block":
            bs = w.get("block_structure")
            if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                raise InvalidConfig(f"{wf}.block_structure must be [rows, columns], got {bs!r}")
            block = (bs[0], bs[1])
        return QuantScheme("compressed-tensors", fmt, 8, strategy=strategy, block=block)
    bits = _choice(w, "num_bits", (4, 8), None, wf)
    strategy = _choice(w, "strategy", ("tensor", "channel", "group"), "tensor", wf)
    group_size = None
    if strategy == "group":
        group_size = _group_size(w, "group_size", wf)
        if group_size is None:
            raise InvalidConfig(f"{wf}.group_size must be set for strategy 'group'")
    actorder = w.get("actorder") or None
    if actorder not in (None, "group", "weight", "static"):
        raise InvalidConfig(
            f"{wf}.actorder {actorder!r} is not supported (supported: null, 'group', 'weight')"
        )
    return QuantScheme(
        "compressed-tensors",
        fmt,
        bits,
        group_size,
        symmetric=symmetric,
        act_order=actorder == "group",
        strategy=strategy,
    )
