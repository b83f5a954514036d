"""Quantized weight formats as pure tensor functions: unpack each checkpoint format into one canonical
form, quantize dense weights into it, fuse projections, and dequantize (the reference every kernel
path is checked against).

Canonical forms (CPU tensors, output rows first, like nn.Linear's weight [out, in]):
- IntWeight: unsigned codes q [n, k] in [0, 2^bits), float32 scales and zero points
  [n, groups], and the group of every input column (`g_idx`, None = column // group_size):
  W[j, i] = (q[j, i] - zeros[j, g(i)]) * scales[j, g(i)] (+ offsets[j, g(i)] when a format has an
  additive float offset: GGUF Q4_1's w = d * q + m, which no integer zero point holds exactly).
- Fp8Weight: float8_e4m3fn codes [n, k] and float32 scales [n, ceil(k / block_cols)], scales expanded
  to every row (a block-wise scale repeats over its block's rows; per-tensor scales over all), so
  that projections of any height fuse by concatenation: W[j, i] = w[j, i] * scales[j, i // block_cols].

Packing orders (checked against the reference implementations):
- GPTQ (AutoGPTQ / GPTQModel): qweight int32 [k * bits / 32, n], input rows packed LSB first (row
  i in word i // (32 / bits) at bit (i % (32 / bits)) * bits); qzeros int32 [groups, n * bits / 32]
  packed the same way along the output dimension; format "gptq" stores zero - 1, "gptq_v2" the zero.
- AWQ GEMM (AutoAWQ): qweight int32 [k, n / 8] and qzeros int32 [groups, n / 8], 8 output columns per
  word in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (nibble s holds column AWQ_ORDER[s]).
- compressed-tensors pack-quantized: weight_packed int32 [n, ceil(k * bits / 32)], signed codes
  offset by 2^(bits - 1) and packed LSB first along the input dimension; an asymmetric zero point is
  packed the same way along the output dimension ([ceil(n * bits / 32), groups]).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpoint
from .scheme import INT4_GROUP_SIZES, QuantScheme

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of a word sits in nibble AWQ_REVERSE_ORDER[c]
FP8_MAX = 448.0  # largest finite float8_e4m3fn

GGUF_GROUP = 32  # llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks (gguf_blocks.py)
GGUF_TENSORS = ("gguf_codes", "gguf_scales", "gguf_mins")

TensorGetter = Callable[[str], "torch.Tensor | None"]


@dataclass
class IntWeight:
    bits: int
    q: torch.Tensor  # uint8 [n, k]
    scales: torch.Tensor  # float32 [n, groups]
    zeros: torch.Tensor  # float32 [n, groups]: integers in the checkpoint formats, any value on the fly
    group_size: int  # input columns per group (k when one group per row)
    g_idx: torch.Tensor | None = None  # int64 [k], None = arange(k) // group_size
    offsets: torch.Tensor | None = None  # float32 [n, groups] added after scaling (GGUF Q4_1's m)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def groups_of_columns(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.q.shape[1]) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """float32 [n, k]."""
        g = self.groups_of_columns()
        w = (self.q.float() - self.zeros[:, g]) * self.scales[:, g]
        return w if self.offsets is None else w + self.offsets[:, g]


@dataclass
class Fp8Weight:
    weight: torch.Tensor  # float8_e4m3fn [n, k]
    scales: torch.Tensor  # float32 [n, ceil(k / block_cols)]
    block_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self) -> torch.Tensor:
        k = self.weight.shape[1]
        return self.weight.float() * self.scales.repeat_interleave(self.block_cols, dim=1)[:, :k]


QuantizedWeight = IntWeight | Fp8Weight

# -- bit unpacking --------------------------------------------------------------------------------


def _shifts(bits: int) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes per word along dim 0 → uint8 [R * 32 / bits, C]."""
    codes = (packed.unsqueeze(1) >> _shifts(bits).view(1, -1, 1)) & ((1 << bits) - 1)
    return codes.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] with 32/bits codes per word along dim 1 → uint8 [R, C * 32 / bits]."""
    codes = (packed.unsqueeze(-1) >> _shifts(bits)) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of unpack_rows (tests and GPTQ-style writers): uint8 [R, C] → int32 [R * bits / 32, C]."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(-1, per, codes.shape[1]) << _shifts(bits).to(torch.int64).view(1, -1, 1)
    return _to_int32(c.sum(dim=1))


def pack_cols(codes: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint8 [R, C] → int32 [R, C * bits / 32]; `order[s]` = the column of a word stored in slot s."""
    per = 32 // bits
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, per)
    if order is not None:
        c = c[..., list(order)]
    return _to_int32((c << _shifts(bits).to(torch.int64)).sum(dim=-1))


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    # Two's complement wrap of unsigned 32-bit words into int32.
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


# -- checkpoint formats ---------------------------------------------------------------------------

# Tensors of one linear layer each format reads (besides `bias`, which loads like a dense tensor).
FORMAT_TENSORS: dict[str, tuple[str, ...]] = {
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "gptq_v2": ("qweight", "qzeros", "scales", "g_idx"),
    "awq-gemm": ("qweight", "qzeros", "scales"),
    "pack-quantized": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"),
    "float-quantized": ("weight", "weight_scale", "weight_zero_point", "input_scale"),
    "fp8-block": ("weight", "weight_scale_inv", "input_scale"),
    "fp8-tensor": ("weight", "weight_scale", "input_scale"),
    "dense": ("weight",),
    "gguf": GGUF_TENSORS,
}
# The tensor whose presence marks a layer as quantized in the checkpoint (ignored layers lack it).
FORMAT_MARKER = {
    "gptq": "qweight",
    "gptq_v2": "qweight",
    "awq-gemm": "qweight",
    "pack-quantized": "weight_packed",
    "float-quantized": "weight_scale",
    "fp8-block": "weight_scale_inv",
    "fp8-tensor": "weight_scale",
    "dense": "weight",
    "gguf": GGUF_TENSORS[0],
}


class _Reader:
    """Fetches one layer's tensors by suffix, with errors naming the checkpoint tensor."""

    def __init__(self, get: TensorGetter, prefix: str) -> None:
        self.get, self.prefix = get, prefix

    def name(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def optional(self, suffix: str) -> torch.Tensor | None:
        return self.get(self.name(suffix))

    def required(self, suffix: str) -> torch.Tensor:
        t = self.get(self.name(suffix))
        if t is None:
            raise CorruptCheckpoint(f"tensor {self.name(suffix)} is missing (needed by the quantized layer)")
        return t

    def check(self, ok: bool, suffix: str, t: torch.Tensor, expected: str) -> None:
        if not ok:
            raise CorruptCheckpoint(
                f"tensor {self.name(suffix)} is {str(t.dtype).removeprefix('torch.')} {list(t.shape)}, expected {expected}"
            )


def read_quantized(scheme: QuantScheme, get: TensorGetter, prefix: str) -> QuantizedWeight:
    """The canonical weight of checkpoint layer `prefix` (e.g. model.layers.0.self_attn.q_proj)."""
    r = _Reader(get, prefix)
    if scheme.fmt in ("gptq", "gptq_v2"):
        return _read_gptq(scheme, r)
    if scheme.fmt == "awq-gemm":
        return _read_awq(scheme, r)
    if scheme.fmt == "pack-quantized":
        return _read_ct_packed(scheme, r)
    if scheme.fmt in ("float-quantized", "fp8-block", "fp8-tensor"):
        return _read_fp8(scheme, r)
    if scheme.fmt == "dense":
        return quantize_dense(scheme, r.required("weight"))
    if scheme.fmt == "gguf":
        return _read_gguf(scheme, r)
    raise ValueError(f"unknown format {scheme.fmt!r}")  # QuantScheme parsing refuses these


def _group_index(
    r: _Reader, g_idx: torch.Tensor | None, k: int, group_size: int, groups: int, suffix: str = "g_idx"
):
    if g_idx is None:
        return None
    r.check(
        g_idx.dim() == 1 and g_idx.shape[0] == k and not g_idx.dtype.is_floating_point,
        suffix,
        g_idx,
        f"int [{k}]",
    )
    g = g_idx.to(torch.int64)
    if bool(((g < 0) | (g >= groups)).any()):
        raise CorruptCheckpoint(f"tensor {r.name(suffix)} has groups outside [0, {groups})")
    if torch.equal(g, torch.arange(k) // group_size):
        return None  # the trivial order: no act-order permutation to carry
    return g


def _read_gptq(scheme: QuantScheme, r: _Reader) -> IntWeight:
    bits, per = scheme.bits, 32 // scheme.bits
    qweight, qzeros, scales = r.required("qweight"), r.required("qzeros"), r.required("scales")
    r.check(
        qweight.dtype == torch.int32 and qweight.dim() == 2, "qweight", qweight, "int32 [k * bits / 32, n]"
    )
    k, n = qweight.shape[0] * per, qweight.shape[1]
    gs = scheme.group_size or k
    groups = -(-k // gs)
    r.check(
        scales.shape == (groups, n) and scales.dtype.is_floating_point,
        "scales",
        scales,
        f"float [{groups}, {n}]",
    )
    r.check(
        qzeros.dtype == torch.int32 and qzeros.shape == (groups, n // per),
        "qzeros",
        qzeros,
        f"int32 [{groups}, {n // per}]",
    )
    zeros = unpack_cols(qzeros, bits).float()
    if scheme.fmt == "gptq":
        zeros += 1  # v1 stores zero - 1 (without wrapping: a stored 2^bits - 1 reads back as 2^bits)
    g_idx = r.optional("g_idx")
    return IntWeight(
        bits,
        unpack_rows(qweight, bits).t().contiguous(),
        scales.float().t().contiguous(),
        zeros.t().contiguous(),
        gs,
        _group_index(r, g_idx, k, gs, groups),
    )


def _read_awq(scheme: QuantScheme, r: _Reader) -> IntWeight:
    qweight, qzeros, scales = r.required("qweight"), r.required("qzeros"), r.required("scales")
    r.check(qweight.dtype == torch.int32 and qweight.dim() == 2, "qweight", qweight, "int32 [k, n / 8]")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    gs = scheme.group_size or k
    groups = -(-k // gs)
    r.check(
        scales.shape == (groups, n) and scales.dtype.is_floating_point,
        "scales",
        scales,
        f"float [{groups}, {n}]",
    )
    r.check(
        qzeros.dtype == torch.int32 and qzeros.shape == (groups, n // 8),
        "qzeros",
        qzeros,
        f"int32 [{groups}, {n // 8}]",
    )
    order = list(AWQ_REVERSE_ORDER)

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        codes = unpack_cols(packed, 4).view(packed.shape[0], -1, 8)[..., order]
        return codes.reshape(packed.shape[0], -1)

    return IntWeight(
        4,
        unpack(qweight).t().contiguous(),
        scales.float().t().contiguous(),
        unpack(qzeros).float().t().contiguous(),
        gs,
    )


def _read_ct_packed(scheme: QuantScheme, r: _Reader) -> IntWeight:
    bits, offset = scheme.bits, 1 << (scheme.bits - 1)
    packed, scale, shape = r.required("weight_packed"), r.required("weight_scale"), r.required("weight_shape")
    r.check(
        packed.dtype == torch.int32 and packed.dim() == 2, "weight_packed", packed, "int32 [n, k * bits / 32]"
    )
    r.check(shape.numel() == 2 and not shape.dtype.is_floating_point, "weight_shape", shape, "int [2]")
    n, k = (int(v) for v in shape.reshape(-1))
    words = -(-k * bits // 32)
    r.check(packed.shape == (n, words), "weight_packed", packed, f"int32 [{n}, {words}]")
    if scheme.strategy == "group":
        gs = scheme.group_size
    else:
        gs = k
    groups = -(-k // gs)
    if scheme.strategy == "tensor":
        r.check(scale.numel() == 1, "weight_scale", scale, "one value")
        scale = scale.reshape(1, 1).expand(n, 1)
    r.check(
        tuple(scale.shape) == (n, groups) and scale.dtype.is_floating_point,
        "weight_scale",
        scale,
        f"float [{n}, {groups}]",
    )
    if scheme.symmetric:
        zeros = torch.full((n, groups), float(offset))
    else:
        zp = r.required("weight_zero_point")
        if scheme.strategy == "tensor":
            r.check(zp.numel() == 1, "weight_zero_point", zp, "one value")
            zeros = (zp.reshape(1, 1).float() + offset).expand(n, 1)
        else:
            zp_words = -(-n * bits // 32)
            r.check(
                zp.dtype == torch.int32 and zp.shape == (zp_words, groups),
                "weight_zero_point",
                zp,
                f"int32 [{zp_words}, {groups}]",
            )
            zeros = unpack_rows(zp, bits)[:n].float()
    g_idx = r.optional("weight_g_idx")
    if g_idx is not None:
        g_idx = _group_index(r, g_idx, k, gs, groups, "weight_g_idx")
    return IntWeight(
        bits,
        unpack_cols(packed, bits)[:, :k].contiguous(),
        scale.float().contiguous(),
        zeros.contiguous(),
        gs,
        g_idx,
    )


def _read_fp8(scheme: QuantScheme, r: _Reader) -> Fp8Weight:
    weight = r.required("weight")
    r.check(weight.dtype == torch.float8_e4m3fn and weight.dim() == 2, "weight", weight, "F8_E4M3 [n, k]")
    n, k = weight.shape
    suffix = "weight_scale_inv" if scheme.fmt == "fp8-block" else "weight_scale"
    scale = r.required(suffix)
    r.check(scale.dtype.is_floating_point, suffix, scale, "float")
    scale = scale.float()
    if scheme.block is not None:
        bn, bk = scheme.block
        rows, cols = -(-n // bn), -(-k // bk)
        r.check(tuple(scale.shape) == (rows, cols), suffix, scale, f"float [{rows}, {cols}]")
        return Fp8Weight(weight, scale.repeat_interleave(bn, dim=0)[:n].contiguous(), bk)
    if scheme.strategy == "channel":
        r.check(scale.numel() == n and scale.shape[0] == n, suffix, scale, f"float [{n}, 1]")
        return Fp8Weight(weight, scale.reshape(n, 1).contiguous(), k)
    r.check(scale.numel() == 1, suffix, scale, "one value")
    zp = r.optional("weight_zero_point")
    if zp is not None and bool(zp.any()):
        raise CorruptCheckpoint(
            f"tensor {r.name('weight_zero_point')} is not zero (float weights are symmetric)"
        )
    return Fp8Weight(weight, scale.reshape(1, 1).expand(n, 1).contiguous(), k)


def _read_gguf(scheme: QuantScheme, r: _Reader) -> IntWeight:
    from .gguf_blocks import gguf_weight  # it builds IntWeights: imported here, not at the top

    block_type = scheme.gguf_type(r.prefix)
    if block_type is None:
        raise CorruptCheckpoint(
            f"tensor {r.name(GGUF_TENSORS[0])}: config.json quantization_config.tensor_types has no entry "
            f"for {r.prefix}"
        )
    codes, scales = r.required("gguf_codes"), r.required("gguf_scales")
    mins = r.optional("gguf_mins")
    bits = 8 if block_type == "Q8_0" else 4
    n = codes.shape[0] if codes.dim() == 2 else 0
    k = scales.shape[1] * GGUF_GROUP if scales.dim() == 2 else 0
    r.check(
        codes.dtype == torch.uint8 and codes.dim() == 2 and codes.shape[1] * 8 // bits == k,
        "gguf_codes",
        codes,
        f"uint8 [n, k * {bits} / 8] for {block_type} (k = 32 × the scales' columns)",
    )
    r.check(
        scales.dtype == torch.float16 and scales.shape == (n, k // GGUF_GROUP),
        "gguf_scales",
        scales,
        f"F16 [{n}, {k // GGUF_GROUP}]",
    )
    if block_type == "Q4_1":
        mins = r.required("gguf_mins")
        r.check(
            mins.dtype == torch.float16 and mins.shape == scales.shape,
            "gguf_mins",
            mins,
            f"F16 {list(scales.shape)}",
        )
    return gguf_weight(block_type, codes, scales, mins if block_type == "Q4_1" else None)


# -- quantizing dense weights ---------------------------------------------------------------------


def int4_group_size(k: int) -> int:
    """Groups of 128, else the largest of 64 and 32 that divides the input size, else one group."""
    for g in INT4_GROUP_SIZES:
        if k % g == 0:
            return g
    return k


def quantize_dense(scheme: QuantScheme, w: torch.Tensor) -> QuantizedWeight:
    w = w.float()
    if scheme.method == "int8":
        return quantize_int8(w)
    if scheme.method == "int4":
        return quantize_int4(w, int4_group_size(w.shape[1]))
    return quantize_fp8(w)


def quantize_int8(w: torch.Tensor) -> IntWeight:
    """Symmetric, one scale per output channel: codes q - 128 in [-127, 127]."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # In place on one temporary: a Load quantizes layer after layer, and fewer large temporaries
    # keep the allocator's high-water mark near the quantized size.
    q = torch.div(w, scale).round_().clamp_(-127, 127).add_(128).to(torch.uint8)
    return IntWeight(8, q, scale, torch.full_like(scale, 128.0), w.shape[1])


def quantize_int4(w: torch.Tensor, group_size: int) -> IntWeight:
    """Asymmetric (min/max) groups of `group_size` input columns: W = q * scale + min, i.e. a float
    zero point -min / scale (the int4 kernels' own domain; an integer zero point would move the grid
    off each group's minimum and cost accuracy)."""
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.sub(g, lo.unsqueeze(-1)).div_(scale.unsqueeze(-1)).round_().clamp_(0, 15).to(torch.uint8)
    return IntWeight(4, q.reshape(n, k), scale, -lo / scale, group_size)


def quantize_fp8(w: torch.Tensor) -> Fp8Weight:
    """float8_e4m3fn with one scale per output channel."""
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Fp8Weight((w / scale).to(torch.float8_e4m3fn), scale, w.shape[1])


# -- fusing projections ---------------------------------------------------------------------------


def fuse(parts: list[QuantizedWeight], where: str) -> QuantizedWeight:
    """Concatenate the weights of projections of one input (q/k/v, gate/up) along the output rows."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, Fp8Weight):
        if not all(isinstance(p, Fp8Weight) and p.block_cols == first.block_cols for p in parts):
            raise CorruptCheckpoint(f"{where}: the fused projections are quantized differently")
        return Fp8Weight(
            torch.cat([p.weight for p in parts]), torch.cat([p.scales for p in parts]), first.block_cols
        )
    same = all(
        isinstance(p, IntWeight)
        and p.bits == first.bits
        and p.group_size == first.group_size
        and p.q.shape[1] == first.q.shape[1]
        and (
            (p.g_idx is None and first.g_idx is None)
            or (p.g_idx is not None and first.g_idx is not None and torch.equal(p.g_idx, first.g_idx))
        )
        for p in parts
    )
    if not same:
        raise CorruptCheckpoint(
            f"{where}: the fused projections are quantized differently (bits, group size or act-order g_idx); "
            "projections of one input must share them"
        )
    offsets = None
    if any(p.offsets is not None for p in parts):
        offsets = torch.cat(
            [p.offsets if p.offsets is not None else torch.zeros_like(p.scales) for p in parts]
        )
    return IntWeight(
        first.bits,
        torch.cat([p.q for p in parts]),
        torch.cat([p.scales for p in parts]),
        torch.cat([p.zeros for p in parts]),
        first.group_size,
        first.g_idx,
        offsets,
    )
