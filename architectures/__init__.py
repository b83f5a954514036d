"""Built-in architectures. Importing this package touches neither CUDA nor flash_attn."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry import ModelRegistry


def register_builtin(registry: ModelRegistry) -> None:
    """Register every architecture and attention backend shipped with modelworker."""
    from . import llama, qwen2
    from .backends import register_builtin_backends

    register_builtin_backends(registry.attention_backends)

    registry.register_architecture("LlamaForCausalLM", llama.build)
    registry.register_architecture("MistralForCausalLM", llama.build)
    registry.register_architecture("Qwen2ForCausalLM", qwen2.build)
