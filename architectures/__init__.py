"""Built-in architectures. Importing this package touches neither CUDA nor flash_attn.

It asks MKL for results that do not depend on the thread count (`MKL_CBWR=AUTO,STRICT`, unless the
environment says otherwise; MKL reads it at its first call, so it is set before any model runs).
Without it MKL's GEMMs split their sums by thread: on an AMD EPYC the same 6-token forward gave
other last bits on a 1-thread overflow compute thread than on the 2-thread primary one
(worker/compute_threads.py), so a reply depended on what else the worker was doing. With it the
SmolLM2 decode step and prefill ran as fast as before there.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

if TYPE_CHECKING:
    from registry import ModelRegistry


def register_builtin(registry: ModelRegistry) -> None:
    """Register every architecture and attention backend shipped with modelworker."""
    from . import gemma2, gemma3, llama, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe
    from .backends import register_builtin_backends

    register_builtin_backends(registry.attention_backends)

    registry.register_architecture("LlamaForCausalLM", llama.build)
    registry.register_architecture("MistralForCausalLM", llama.build)
    registry.register_architecture("Qwen2ForCausalLM", qwen2.build)
    registry.register_architecture("Qwen3ForCausalLM", qwen3.build)
    registry.register_architecture("Qwen2MoeForCausalLM", qwen2_moe.build)
    registry.register_architecture("Qwen3MoeForCausalLM", qwen3_moe.build)
    registry.register_architecture("MixtralForCausalLM", mixtral.build)
    registry.register_architecture("Gemma2ForCausalLM", gemma2.build)
    registry.register_architecture("Gemma3ForCausalLM", gemma3.build)
    registry.register_architecture("Phi3ForCausalLM", phi3.build)
