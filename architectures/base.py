"""CausalLM: a decoder network plus its caches, behind the registry's Model interface.

The network (`LlamaForCausalLM`, ...) only maps tokens to hidden states through an attention
context; this class owns the caches and the attention backend, checks every argument before any
tensor work, and turns hidden states into float32 logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import torch
from torch import nn

from registry import (
    BackendRequirements,
    CacheSpec,
    FailedPrecondition,
    InvalidConfig,
    InvalidRequest,
    KvLayout,
    LoadOptions,
    LoadPlan,
    Model,
    ModelConfig,
    OutOfResources,
    WeightMapping,
)
from registry.errors import IncompatibleLayout
from registry.load_plan import make_load_plan
from registry.parallel import attention_shard
from registry.safetensors_loader import index_checkpoint, load_checkpoint

from .backends import BACKENDS, AttentionBackend
from .compiled_decode import CompiledDecode, check_compilable
from .cpu_gemm import use_gemm
from .kv_cache import ContiguousContext, ContiguousKvCache, DenseContext
from .layers import RotaryEmbedding
from .paged import PagedContext, PagedKvCache, prepare_paged_batch
from .quantize_build import SkippingMapping, fill_quantized_layers, plan_quantized_layers
from .quantized_linear import resident_totals


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class CausalLMNetwork(Protocol):
    """What `build_causal_lm` needs of a network class (`LlamaForCausalLM`, ...): built from the
    config, with the checkpoint → parameter mapping declared on the class. The instance provides
    `model(input_ids, positions, rotary, ctx)` → final hidden states, `compute_logits(hidden)` →
    logits in the model dtype, and `tie_weights(config)`."""

    weight_mapping: ClassVar[WeightMapping]

    def __call__(self, config: ModelConfig) -> nn.Module: ...


def build_causal_lm(
    model_dir: Path,
    device: torch.device,
    options: LoadOptions,
    network_class: CausalLMNetwork,
    plan: LoadPlan | None = None,
) -> CausalLM:
    """Build `network_class` from the plan the registry made for this Load (config parsed once,
    dtype, cache sizes, backend). Without a plan (a builder called directly) one is made here."""
    if plan is None:
        config = ModelConfig.from_file(model_dir / "config.json")
        plan = make_load_plan(model_dir, config.architecture, config, options, device, BACKENDS)
    config, dtype, scheme = plan.config, plan.dtype, plan.quantization
    mapping = network_class.weight_mapping
    try:
        # Build on the meta device so no time goes into random initialisation, then materialise
        # uninitialised storage on the target device and fill it from the checkpoint.
        parallel = plan.parallel
        with torch.device("meta"):
            if parallel.enabled:
                prequantized = scheme is not None and not scheme.on_the_fly
                _check_shardable(network_class, config, parallel.world_size, quantized=prequantized)
                network = network_class(config, parallel)  # type: ignore[call-arg]
            else:
                network = network_class(config)
        if options.compile_decode:  # refused before any weight is read
            check_compilable(config, device, network, parallel.enabled)
        if scheme is not None:  # quantized layers become placeholders that own only their bias
            entries = index_checkpoint(model_dir)
            slots = plan_quantized_layers(network, entries, mapping, scheme)
        network = network.to(dtype=dtype).to_empty(device=device)
        network.tie_weights(config)  # to_empty gives each module its own storage
        if scheme is not None:
            consumed = fill_quantized_layers(network, slots, entries, scheme, device, dtype)
            mapping = SkippingMapping.around(mapping, consumed)
        loaded = load_checkpoint(network, model_dir, mapping, options.load_mode)
        network.eval().requires_grad_(False)
        use_gemm(network, plan.options.cpu_gemm)
        return CausalLM(network, plan, mapped_bytes=loaded.mapped_bytes)
    except Exception as exc:
        # The cached blocks are released by the registry once the half-built model is dropped
        # (empty_cache here would run while this frame still holds the weights).
        if is_out_of_memory(exc):
            raise OutOfResources(f"out of memory on {device} while loading {model_dir}: {exc}") from None
        raise


def _check_shardable(
    network_class: CausalLMNetwork, config: ModelConfig, world_size: int, *, quantized: bool = False
) -> None:
    """INVALID_ARGUMENT before anything is built when this network cannot be split over the ranks."""
    if not getattr(network_class, "supports_tensor_parallel", False):
        raise InvalidConfig(
            f"{config.architecture} does not support tensor parallelism (asked for {world_size} ranks)"
        )
    if quantized:  # a pre-quantized checkpoint's packed layers are not sliced (quantizing at Load is)
        raise InvalidConfig(
            f"quantized {config.architecture} does not support tensor parallelism yet: its quantized "
            f"layers (packed weights and their scales) are not split across ranks (asked for {world_size} "
            f"ranks); load it with tensor_parallel_size 1, or load a dense checkpoint with quantization "
            f"int8 / int4 / fp8 (each rank quantizes its own slice)"
        )
    attention_shard(config.num_attention_heads, config.num_key_value_heads, world_size, 0)


class CausalLM(Model):
    def __init__(self, network: nn.Module, plan: LoadPlan, *, mapped_bytes: int = 0) -> None:
        """`mapped_bytes`: the part of the weights that are views of the memory-mapped checkpoint."""
        config, device, dtype, spec = plan.config, plan.device, plan.dtype, plan.cache
        self.config = config
        self.parallel = plan.parallel
        # KV heads this rank caches (all of them without tensor parallelism).
        kv_heads = config.num_key_value_heads
        if self.parallel.enabled:
            kv_heads = attention_shard(
                config.num_attention_heads, kv_heads, self.parallel.world_size, self.parallel.rank
            ).num_kv_heads
        self.network = network
        self._device = device
        self._dtype = dtype
        self.rotary = RotaryEmbedding(config, device, dtype)
        self._weight_bytes, self._num_parameters = resident_totals(network)
        self._quantization = plan.quantization.label if plan.quantization is not None else ""
        self._mapped_bytes = mapped_bytes
        self._load_mode = plan.options.load_mode if mapped_bytes else "copy"
        self._cpu_gemm = plan.options.cpu_gemm
        if plan.attention_backend:
            self.backend: AttentionBackend = plan.create_backend()  # type: ignore[assignment]
        else:  # a registry without backends (only architectures registered): the built-in ones
            requirements = BackendRequirements(device, dtype, spec.block_size, config.head_dim)
            self.backend = BACKENDS.select(plan.options.attention_backend, requirements)
        c = config
        self.contiguous = ContiguousKvCache(
            c.num_hidden_layers,
            spec.max_batch_size,
            spec.max_seq_len,
            kv_heads,
            c.head_dim,
            dtype,
            device,
        )
        self.paged = PagedKvCache(
            c.num_hidden_layers,
            spec.num_blocks,
            spec.block_size,
            kv_heads,
            c.head_dim,
            dtype,
            device,
        )
        self._cache_spec = spec
        self.graphs = None  # DecodeGraphs when decode steps replay CUDA graphs
        if self._graphs_apply(plan.options):
            self._capture_graphs()
        self.compiled_decode: CompiledDecode | None = None
        if plan.options.compile_decode:
            self._compile_decode()

    def _compile_decode(self) -> None:
        compiled = CompiledDecode(self.network.model, self.contiguous, self.rotary)
        try:
            compiled.warm_up(self._device)
        except Exception as exc:  # e.g. no C++ compiler for inductor on this host
            if is_out_of_memory(exc):
                raise OutOfResources(
                    f"out of memory on {self._device} while compiling decode steps: {exc}"
                ) from None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FailedPrecondition(
                f"compile_decode: torch.compile failed on this host ({type(exc).__name__}: {first}); "
                "load without compile_decode"
            ) from exc
        self.compiled_decode = compiled

    # -- CUDA graphs ---------------------------------------------------------------------------
    def _graphs_apply(self, options: LoadOptions) -> bool:
        """Graphs on CUDA with the triton backend (its kernels read every length from the device),
        unless the Load asked for eager mode; not with dynamic RoPE or LongRoPE (their table depends on
        the call), nor MoE networks (their expert grouping reads counts on the host)."""
        return (
            self._device.type == "cuda"
            and self.backend.name == "triton"
            and not options.enforce_eager
            and not self.rotary.dynamic
            and not self.parallel.enabled  # collectives are not captured
            and self.rotary.long_from is None
            and getattr(self.network, "cuda_graph_safe", True)
        )

    def _capture_graphs(self) -> None:
        from .backends.triton_backend import decode_splits
        from .cuda_graphs import DEFAULT_MAX_GRAPH_BATCH, DecodeGraphs

        cache = self.paged
        longest = min(self.config.position_limit, cache.num_slots)
        max_blocks = min(cache.num_blocks, -(-longest // cache.block_size))
        # One split count for captured and eager decode alike: replays compute what eager calls do.
        self.backend.fixed_splits = decode_splits(longest)
        with torch.inference_mode():  # as forward_paged runs
            self.graphs = DecodeGraphs.capture(cache, self._decode_step, DEFAULT_MAX_GRAPH_BATCH, max_blocks)

    def _decode_step(self, batch) -> torch.Tensor:
        """Logits [num_seqs, vocab] of a decode batch (one token per sequence, in order)."""
        from .paged import PagedContext

        hidden = self.network.model(
            batch.input_tokens, batch.positions, self.rotary, PagedContext(self.paged, batch, self.backend)
        )
        return self._logits(hidden)

    @property
    def tensor_parallel_size(self) -> int:
        return self.parallel.world_size

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        return list(self.graphs.sizes) if self.graphs is not None else []

    @property
    def cuda_graph_bytes(self) -> int:
        return self.graphs.nbytes if self.graphs is not None else 0

    # -- metadata ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def weight_bytes(self) -> int:
        return self._weight_bytes

    @property
    def mapped_weight_bytes(self) -> int:
        return self._mapped_bytes

    @property
    def compile_seconds(self) -> float:
        return self.compiled_decode.compile_seconds if self.compiled_decode is not None else 0.0

    @property
    def load_mode(self) -> str:
        return self._load_mode

    @property
    def cpu_gemm(self) -> str:
        return self._cpu_gemm

    @property
    def cache_spec(self) -> CacheSpec:
        return self._cache_spec

    @property
    def attention_backend(self) -> str:
        return self.backend.name

    @property
    def quantization(self) -> str:
        return self._quantization

    # -- validation ----------------------------------------------------------------------------
    def _check_tokens(self, ids: torch.Tensor, field: str = "input_ids") -> None:
        if ids.numel() == 0:
            raise InvalidRequest(f"{field} is empty")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise InvalidRequest(
                f"{field}{list(index)} = {int(ids[index])} is outside the vocabulary [0, {self.config.vocab_size})"
            )

    def _check_positions(self, positions: torch.Tensor, shape: torch.Size, field: str = "positions") -> None:
        if positions.shape != shape:
            raise InvalidRequest(f"{field} has shape {list(positions.shape)}, expected {list(shape)}")
        limit = self.config.position_limit
        bad = (positions < 0) | (positions >= limit)
        if bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise InvalidRequest(f"{field}{list(index)} = {int(positions[index])} is outside [0, {limit})")

    def _as_long(self, t: torch.Tensor | Sequence[int], field: str) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise InvalidRequest(f"{field} must hold integers, got {t.dtype}")
        return t.to(device=self._device, dtype=torch.long)

    def _prepare_dense(self, input_ids, positions, default_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_loaded()
        ids = self._as_long(input_ids, "input_ids")
        if ids.dim() != 2:
            raise InvalidRequest(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        self._check_tokens(ids)
        if positions is None:
            pos = torch.arange(default_start, default_start + ids.shape[1], device=self._device).expand_as(
                ids
            )
            self._check_positions(pos, ids.shape)
        else:
            pos = self._as_long(positions, "positions")
            self._check_positions(pos, ids.shape)
        return ids, pos

    def _require_loaded(self) -> None:
        if self.network is None:
            raise InvalidRequest("the model has been released")

    # -- forward passes ------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.network.compute_logits(hidden).float()

    def _run(self, ids: torch.Tensor, pos: torch.Tensor, ctx, body: nn.Module | None = None) -> torch.Tensor:
        """The network body (or `body`, its compiled form) over one call's tokens."""
        try:
            return (self.network.model if body is None else body)(ids, pos, self.rotary, ctx)
        except Exception as exc:
            if is_out_of_memory(exc):
                raise OutOfResources(
                    f"out of memory on {self._device} during the forward pass: {exc}"
                ) from None
            raise

    @torch.inference_mode()
    def forward(self, input_ids, positions=None, *, all_logits: bool = True) -> torch.Tensor:
        ids, pos = self._prepare_dense(input_ids, positions, 0)
        hidden = self._run(ids, pos, DenseContext())
        return self._logits(hidden if all_logits else hidden[:, -1])

    @torch.inference_mode()
    def forward_with_cache(
        self, input_ids, start_pos: int, seq_len: int, positions=None, *, all_logits: bool = True
    ):
        cache = self.contiguous
        ids = self._as_long(input_ids, "input_ids")
        if ids.dim() != 2:
            raise InvalidRequest(f"input_ids must be [batch, seq], got shape {list(ids.shape)}")
        batch = ids.shape[0]
        if seq_len != ids.shape[1]:
            raise InvalidRequest(f"seq_len {seq_len} does not match input_ids of shape {list(ids.shape)}")
        if batch < 1 or batch > cache.max_batch_size:
            raise InvalidRequest(f"batch {batch} is outside the cache's rows [1, {cache.max_batch_size}]")
        if start_pos < 0 or start_pos + seq_len > cache.max_seq_len:
            raise InvalidRequest(
                f"start_pos {start_pos} + seq_len {seq_len} exceeds the cache's max_seq_len {cache.max_seq_len}"
            )
        for row in range(batch):
            if start_pos > cache.filled[row]:
                raise InvalidRequest(
                    f"start_pos {start_pos} leaves a gap in cache row {row}, which holds {cache.filled[row]} tokens"
                )
        ids, pos = self._prepare_dense(ids, positions, start_pos)
        compiled, body = self.compiled_decode, None
        if compiled is not None and compiled.applies(batch, seq_len, start_pos):
            ids, pos, body = compiled.inputs(ids, pos) + (compiled.module,)
        hidden = self._run(ids, pos, ContiguousContext(cache, start_pos), body)
        for row in range(batch):
            cache.filled[row] = start_pos + seq_len
        return self._logits(hidden if all_logits else hidden[:, -1])

    @torch.inference_mode()
    def forward_paged(
        self,
        input_tokens,
        positions,
        block_tables,
        slot_mapping,
        context_lens,
        is_prefill: bool,
        query_lens=None,
        *,
        all_logits: bool = False,
        logits_indices: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """logits_indices: rows of the concatenated tokens to score (speculative verification), instead
        of the last token of each sequence or every token."""
        self._require_loaded()
        batch = prepare_paged_batch(
            self.paged,
            input_tokens,
            positions,
            block_tables,
            slot_mapping,
            context_lens,
            is_prefill,
            query_lens,
            vocab_size=self.config.vocab_size,
            max_position_embeddings=self.config.position_limit,
        )
        if self.graphs is not None and self.graphs.can_replay(batch):
            return self.graphs.replay(batch)
        hidden = self._run(batch.input_tokens, batch.positions, PagedContext(self.paged, batch, self.backend))
        if logits_indices is not None:
            return self._logits(
                hidden[torch.as_tensor(logits_indices, dtype=torch.long, device=hidden.device)]
            )
        if all_logits or batch.is_decode_only:  # one row per sequence: its last token is its only one
            return self._logits(hidden)
        return self._logits(hidden[batch.last_token_indices])

    # -- caches --------------------------------------------------------------------------------
    def reset_kv_cache(self) -> None:
        self._require_loaded()
        self.contiguous.reset()
        self.paged.reset()

    def slice_kv_cache(
        self, layer_idx: int, start_pos: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_loaded()
        layers = self.config.num_hidden_layers
        if not 0 <= layer_idx < layers:
            raise InvalidRequest(f"layer_idx {layer_idx} is outside [0, {layers})")
        limit = self.contiguous.max_seq_len
        if start_pos < 0 or length < 0 or start_pos + length > limit:
            raise InvalidRequest(
                f"start_pos {start_pos} + length {length} exceeds the cache's max_seq_len {limit}"
            )
        end = start_pos + length
        k = self.contiguous.k[layer_idx][:, :, start_pos:end].clone()
        v = self.contiguous.v[layer_idx][:, :, start_pos:end].clone()
        if self.parallel.enabled:
            k, v = self._gather_kv_heads(k, v, 1)
            k, v = k.to(self._device), v.to(self._device)
        return k, v

    def _gather_kv_heads(
        self, k: torch.Tensor, v: torch.Tensor, dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's KV heads (local ones along `dim`) → all KV heads along `dim`, in head order, on
        the host; a replicated head is taken from the first rank holding it."""
        c, world = self.config, self.parallel.world_size
        parts = self.parallel.all_gather_object((k.cpu(), v.cpu()))
        heads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for rank, (rk, rv) in enumerate(parts):
            shard = attention_shard(c.num_attention_heads, c.num_key_value_heads, world, rank)
            for i in range(shard.num_kv_heads):
                heads.setdefault(shard.kv_start + i, (rk.select(dim, i), rv.select(dim, i)))
        ordered = [heads[h] for h in range(c.num_key_value_heads)]
        return torch.stack([h[0] for h in ordered], dim=dim), torch.stack([h[1] for h in ordered], dim=dim)

    def _local_kv_heads(self) -> tuple[int, int]:
        """(first, count) of the KV heads this rank caches."""
        c = self.config
        shard = attention_shard(
            c.num_attention_heads, c.num_key_value_heads, self.parallel.world_size, self.parallel.rank
        )
        return shard.kv_start, shard.num_kv_heads

    @property
    def kv_layout(self) -> KvLayout | None:
        from .kv_blocks import layout_of

        if self.paged is None:
            return None
        layout = layout_of(self.paged)
        if self.parallel.enabled:  # transfers carry every rank's heads
            layout = dataclasses.replace(layout, num_kv_heads=self.config.num_key_value_heads)
        return layout

    def export_kv_blocks(
        self, block_ids: Sequence[int], layer_start: int = 0, layer_end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .kv_blocks import read_blocks

        self._require_loaded()
        k, v = read_blocks(self.paged, block_ids, layer_start, layer_end)
        if self.parallel.enabled:  # [layers, blocks, block_size, kv_heads, head_dim]
            k, v = self._gather_kv_heads(k, v, 3)
        return k, v

    def import_kv_blocks(self, dst_block_ids: Sequence[int], key: torch.Tensor, value: torch.Tensor) -> None:
        from .kv_blocks import write_blocks

        self._require_loaded()
        if self.parallel.enabled:  # this rank's heads of the whole-head blocks
            full = self.config.num_key_value_heads
            for name, t in (("key", key), ("value", value)):
                if isinstance(t, torch.Tensor) and t.dim() == 5 and t.shape[3] != full:
                    raise IncompatibleLayout(f"{name} has {t.shape[3]} KV heads; this model has {full}")
            first, count = self._local_kv_heads()
            if (
                isinstance(key, torch.Tensor)
                and isinstance(value, torch.Tensor)
                and key.dim() == value.dim() == 5
            ):
                key, value = key[:, :, :, first : first + count], value[:, :, :, first : first + count]
        write_blocks(self.paged, dst_block_ids, key, value)

    def kv_cache_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the KV caches (registry.memory releases and restores their storages)."""
        self._require_loaded()
        return [*self.contiguous.k, *self.contiguous.v, *self.paged.k, *self.paged.v]

    def release(self) -> int:
        freed = self._weight_bytes + self._cache_spec.total_bytes if self.network is not None else 0
        self.network = None
        self.graphs = None
        self.compiled_decode = None
        self.contiguous = None
        self.paged = None
        self.rotary = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        return freed
