"""The models the bench runs: SmolLM2-135M (the demo model, float32) and a tiny random Llama that
exposes fixed overheads; ours through the registry, the reference through transformers."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from registry import KvCacheOptions, LoadOptions, Model, ModelRegistry
from registry.safetensors_loader import checkpoint_files

# Shapes of the timed calls (the figures).
PREFILL_LENGTHS = (128, 512)
DECODE_CONTEXT = 512  # batch-1 decode step: the step's token is the 512th of the sequence
BATCH = 16
BATCH_CONTEXT = 256
BLOCK_SIZE = 16
# Paged blocks: one batch-1 sequence of DECODE_CONTEXT, then BATCH sequences of BATCH_CONTEXT.
NUM_BLOCKS = DECODE_CONTEXT // BLOCK_SIZE + BATCH * (BATCH_CONTEXT // BLOCK_SIZE)
BENCH_KV = KvCacheOptions(
    block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_seq_len=2 * DECODE_CONTEXT, max_batch_size=1
)
# For Load timings: the smallest cache, so the figure is about the weights.
LOAD_KV = KvCacheOptions(block_size=BLOCK_SIZE, num_blocks=4, max_seq_len=64, max_batch_size=1)
TINY_MAX_POSITIONS = 2048


class BenchSetupError(RuntimeError):
    """A model the bench needs is not available (the message says how to get it)."""


@dataclass(frozen=True)
class BenchModel:
    label: str  # as printed in the table
    root: Path  # a model root for the worker
    path: Path  # the model directory, inside root

    @property
    def checkpoint_bytes(self) -> int:
        return sum(p.stat().st_size for p in checkpoint_files(self.path))


def smollm2() -> BenchModel:
    """transformers' reading of the packaged SmolLM2 GGUF as safetensors, cached under .cache/."""
    from tests.real_model import smollm2_hf_dir

    try:
        path = smollm2_hf_dir()
    except BaseException as exc:  # pytest.skip raises a BaseException subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise BenchSetupError(f"SmolLM2-135M is not available ({exc}); run `make install`") from None
    return BenchModel("SmolLM2-135M", path.parent, path)


def tiny(root: Path) -> BenchModel:
    """A random 2-layer Llama (hidden 64, vocab 128) written under `root`."""
    from tests.tiny_models import make_tiny_model_dir

    path = make_tiny_model_dir(
        root / "tiny-llama", "llama", seed=0, max_position_embeddings=TINY_MAX_POSITIONS
    )
    return BenchModel("tiny Llama", root, path)


def new_registry(roots: list[Path]) -> ModelRegistry:
    import architectures

    registry = ModelRegistry(device="cpu", model_roots=roots)
    architectures.register_builtin(registry)
    return registry


def load_ours(
    registry: ModelRegistry,
    model_id: str,
    model: BenchModel,
    kv: KvCacheOptions,
    load_mode: str = "mmap",
    compile_decode: bool = False,
) -> Model:
    options = LoadOptions(
        dtype=torch.float32, device="cpu", kv_cache=kv, load_mode=load_mode, compile_decode=compile_decode
    )
    registry.load_model_auto(model_id, model.path, False, options)
    return registry.get_model(model_id)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_reference(model: BenchModel, attn: str) -> Any:
    """transformers' model of the same directory, float32, eval mode, `attn` = eager | sdpa."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model.path, dtype=torch.float32, attn_implementation=attn
    ).eval()


class ReferenceDecoder:
    """A transformers model with its DynamicCache holding `ids` [batch, context - 1]; `step()` runs
    the decode step of the context-th token, `rewind()` (untimed) drops that token again so every
    step attends over the same context."""

    def __init__(self, hf: Any, prefix: torch.Tensor, repeat: int = 1) -> None:
        from transformers import DynamicCache

        self.hf = hf
        self.length = prefix.shape[1]
        self.cache = DynamicCache(config=hf.config)
        with torch.inference_mode():
            hf(prefix, cache=self.cache, use_cache=True, logits_to_keep=1)
        if repeat > 1:  # the same prefix for every row: one prefill, then copies
            self.cache.batch_repeat_interleave(repeat)
        self.batch = prefix.shape[0] * repeat
        self.positions = torch.full((self.batch, 1), self.length, dtype=torch.long)

    def rewind(self) -> None:
        extra = self.cache.get_seq_length() - self.length
        if extra > 0:
            self.cache.crop(-extra)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, 1] → logits [batch, 1, vocab]."""
        out = self.hf(tokens, cache=self.cache, use_cache=True, position_ids=self.positions)
        return out.logits
