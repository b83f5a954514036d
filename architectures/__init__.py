"""Built-in architectures. Importing this package touches neither CUDA nor flash_attn."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
