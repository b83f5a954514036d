"""Why a goal is missed, by row key: printed next to the figure when a run misses it. Each reason
comes from profiling on the development machine (2-core AMD EPYC, MKL 2024.2, torch 2.13 CPU);
the figures they quote are from there."""

from __future__ import annotations

SMOL = "SmolLM2-135M"
TINY = "tiny Llama"

_LOAD_ASSEMBLY = (
    "besides the read, ~35 ms of assembling the model in Python (modules built on the meta device 13 ms, "
    "to_empty 6 ms, matching 272 tensors to parameters 6 ms, RoPE tables and caches 5 ms)"
)
_GRPC = (
    "the Python gRPC round trip itself (see the Health check) plus the servicer's executor hop and "
    "per-model lock (~0.3 ms); after a full-model forward the Python that builds the reply runs with "
    "cold caches (2× slower than after a tiny model's)"
)

REASONS: dict[str, str] = {
    "load-floor": _LOAD_ASSEMBLY,
    "load-grpc-floor": _LOAD_ASSEMBLY + ", plus the RPC, the admission check and the executor hop",
    f"load-reference-{SMOL}": (
        "transformers maps the file and computes on page-cache pages (no copy: see from_pretrained alone); "
        "we copy into memory the worker owns, so a checkpoint rewritten in place cannot crash a running "
        "forward (SIGBUS), and a first Load pays fresh pages + copy ≈ the read floor"
    ),
    f"load-reference-{TINY}": "fixed cost of assembling the model (see the in-process Load)",
    f"prefill-128-{SMOL}": (
        "within a few %: >90% of both is the same MKL GEMMs and SDPA kernel; our fused gate/up and "
        "q/k/v GEMMs run ~1-3% slower than split ones on this MKL and SiLU reads the strided gate half"
    ),
    f"prefill-512-{SMOL}": (
        "within a few %: >90% of both is the same MKL GEMMs and SDPA kernel; our fused gate/up and "
        "q/k/v GEMMs run ~1-3% slower than split ones on this MKL and SiLU reads the strided gate half"
    ),
    f"decode-with_cache-{SMOL}": (
        "~80% of both steps is the same MKL GEMV over the checkpoint's [out, in] weights (~12 GB/s here); "
        "stored [in, out] it runs at ~17 GB/s (step −25%), but a Load would then transpose 538 MB "
        "(+0.1–0.2 s) and batch ≥ 4 matmuls get ~8% slower, so it is not done"
    ),
    f"decode-paged-{SMOL}": (
        "as forward_with_cache, plus gathering the 512 keys from their blocks in 30 layers (~2 ms) and "
        "validating the batch (~0.4 ms)"
    ),
    f"decode-paged-{TINY}": (
        "a fixed ~0.4 ms per call validates the batch (prepare_paged_batch: small host tensor ops that "
        "check every slot against its block table), against a 0.5 ms step"
    ),
    f"decode-with_cache-{TINY}": "fixed per-call cost of argument checks, against a sub-millisecond step",
    "batched-step": (
        "each layer gathers 16 × 256 keys from their blocks (190 MB of copies per step) where transformers "
        "appends to a contiguous cache; SDPA over the gathered [B, Hkv, M, D] view is ~15% slower than "
        "over a contiguous tensor"
    ),
    "batched-speedup": (
        "batch 16 runs GEMMs (compute-bound here) where batch 1 runs GEMVs (bandwidth-bound); "
        "the ratio rises with batch-1 cost"
    ),
    "memory-after": "the KV cache and weights are held in full; the rest is torch's allocator and per-thread arenas",
    "memory-peak": "transient buffers of the load (allocator arenas of the executor threads)",
}
for _mode in ("LOGITS_LAST float32", "LOGITS_LAST bfloat16", "LOGITS_NONE"):
    for _model in (SMOL, TINY):
        REASONS[f"grpc-{_mode}-{_model}"] = _GRPC
