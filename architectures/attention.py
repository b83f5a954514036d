"""The seam between a model's attention layers and the KV cache it runs over.

An attention layer computes q/k/v and applies RoPE, then hands them to the context of the current
call, which stores K/V where that kind of cache keeps them and computes attention:

- `DenseContext` (stateless `forward`) and `ContiguousContext` (`forward_with_cache`), in
  `architectures/kv_cache.py`: q [batch, seq, n_heads, head_dim], k/v [batch, seq, n_kv_heads, head_dim].
- `PagedContext` (`forward_paged`), in `architectures/paged.py`: the tokens of all sequences flattened,
  q [num_tokens, n_heads, head_dim], k/v [num_tokens, n_kv_heads, head_dim].

The result has q's shape. `window` is the layer's sliding window (None: full causal attention): a
query at position p sees keys at positions (p - window, p]. `softcap` (Gemma 2; None: off) caps the
scaled scores at ±softcap with tanh before the softmax.
"""

from __future__ import annotations

from typing import Protocol

import torch


class AttentionContext(Protocol):
    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor: ...
