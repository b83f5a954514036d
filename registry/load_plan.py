"""LoadPlan: everything a Load decides before a byte of weights is read, computed once.

The registry parses config.json once per Load, resolves the dtype, estimates the weights' bytes
from the checkpoint headers, sizes the KV caches (`plan_cache`) and resolves the attention backend;
the worker's admission check and the builder both read this one plan, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .backends import BackendRegistry, BackendRequirements
from .cache_plan import DEFAULT_BLOCK_SIZE, plan_cache
from .config import ModelConfig
from .cpu_gemm import resolve_cpu_gemm
from .model import CacheSpec, LoadOptions
from .parallel import SINGLE, ParallelContext
from .quantization.estimate import estimate_quantized_bytes
from .quantization.scheme import QuantScheme, scheme_for_load
from .safetensors_loader import estimate_weight_bytes

CONFIG_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(
    config: ModelConfig, device: torch.device, requested: torch.dtype | None, quantized: bool = False
) -> torch.dtype:
    """The dtype a model is loaded in: the one asked for, else ("auto") the checkpoint's dtype on
    CUDA and float32 elsewhere (CPU half precision is slow and lossy), except quantized weights on
    CPU: bfloat16, the only activations torch's int8/int4 CPU kernels are fast with (DESIGN.md,
    "Quantized weights"). The only place "auto" is decided."""
    if requested is not None:
        return requested
    if device.type == "cuda" and config.dtype:
        return CONFIG_DTYPES.get(config.dtype, torch.float32)
    if quantized:
        return torch.bfloat16
    return torch.float32


def is_quantized_load(config: ModelConfig, options: LoadOptions) -> bool:
    """The Load holds quantized weights: a quantized checkpoint, or quantization asked at load."""
    return bool(options.quantization) or config.quantization_method is not None


def resolve_quantization(
    config: ModelConfig, options: LoadOptions, device: torch.device
) -> QuantScheme | None:
    """The Load's quantization: the checkpoint's `quantization_config`, or `options.quantization`
    (INVALID_ARGUMENT for every unsupported variant, before anything is read)."""
    # Asked only when it matters (fp8 needs sm_89+): a dense Load never touches the CUDA driver here.
    quantized = is_quantized_load(config, options)
    capability = torch.cuda.get_device_capability(device) if quantized and device.type == "cuda" else None
    return scheme_for_load(
        config.raw.get("quantization_config"),
        options.quantization,
        options.is_quant_model,
        device.type,
        capability,
    )


def free_device_bytes(device: torch.device) -> int | None:
    """Free accelerator memory (None on CPU, where the cache has a fixed default budget)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return None


def default_block_size(
    backends: BackendRegistry, backend: str, device: torch.device, dtype: torch.dtype, head_dim: int | None
) -> int:
    """The KV block size of a Load that names none: the preference of the backend it would run
    (flash_attn: 256, the multiple its paged cache needs, where flash-attn would run), else
    DEFAULT_BLOCK_SIZE (16: little waste per sequence). The one place this is decided; the plan
    carries it to admission and to the build alike."""
    if not backends.names():
        return DEFAULT_BLOCK_SIZE
    preferred = backends.preferred_block_size(backend, BackendRequirements(device, dtype, None, head_dim))
    return preferred or DEFAULT_BLOCK_SIZE


@dataclass(frozen=True)
class LoadPlan:
    model_dir: Path
    architecture: str
    config: ModelConfig
    options: LoadOptions
    device: torch.device
    dtype: torch.dtype
    weight_bytes: int  # estimated from the checkpoint headers, in `dtype` (quantized: as resident)
    cache: CacheSpec
    # The backend the model gets (`auto` resolved); "" when no backend is registered (toy models).
    attention_backend: str
    backends: BackendRegistry = field(compare=False, repr=False, default_factory=BackendRegistry)
    # This rank's place in a tensor-parallel group (world size 1: the whole model on one device).
    parallel: ParallelContext = field(compare=False, repr=False, default=SINGLE)
    quantization: QuantScheme | None = None  # None: dense weights

    @property
    def total_bytes(self) -> int:
        """What the Load will allocate: weights and both KV caches."""
        return self.weight_bytes + self.cache.total_bytes

    def create_backend(self) -> object:
        """A fresh instance of the planned attention backend (its factory runs only now)."""
        return self.backends.create(self.attention_backend)


def make_load_plan(
    model_dir: Path,
    architecture: str,
    config: ModelConfig,
    options: LoadOptions,
    device: torch.device,
    backends: BackendRegistry,
    *,
    weight_bytes: int | None = None,
    parallel: ParallelContext = SINGLE,
) -> LoadPlan:
    """The plan of one Load. `weight_bytes` None: estimated from the checkpoint's headers (a network
    built in memory, e.g. by a benchmark, passes its own); under tensor parallelism, this rank's
    share (1/N: the replicated norms are a rounding error of it)."""
    quantization = resolve_quantization(config, options, device)
    dtype = resolve_dtype(config, device, options.dtype, quantized=quantization is not None)
    if weight_bytes is None and quantization is not None:
        weight_bytes = estimate_quantized_bytes(model_dir, dtype, options.quantization)
    elif weight_bytes is None:
        weight_bytes = -(-estimate_weight_bytes(model_dir, dtype) // parallel.world_size)
    free = free_device_bytes(device)
    kv = options.kv_cache
    if not kv.block_size:
        block_size = default_block_size(backends, options.attention_backend, device, dtype, config.head_dim)
        kv = replace(kv, block_size=block_size)
    cache = plan_cache(config, kv, dtype, device, None if free is None else max(free - weight_bytes, 0))
    backend = ""
    if backends.names():
        requirements = BackendRequirements(device, dtype, cache.block_size, config.head_dim)
        backend = backends.resolve(options.attention_backend, requirements)
    return LoadPlan(
        model_dir=model_dir,
        architecture=architecture,
        config=config,
        # auto resolved here too: a builder called without the registry gets a concrete kernel.
        options=replace(options, cpu_gemm=resolve_cpu_gemm(options.cpu_gemm, device, dtype)),
        device=device,
        dtype=dtype,
        weight_bytes=weight_bytes,
        cache=cache,
        attention_backend=backend,
        backends=backends,
        parallel=parallel,
        quantization=quantization,
    )
