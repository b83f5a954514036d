"""What `PagedContext` needs from an attention backend. Backends and architectures/paged.py both
import this module (and architectures/paged_batch.py for the types); neither imports the other."""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch

from ..paged_batch import PagedBatch, PagedKvCache

PlanT = TypeVar("PlanT")


class AttentionBackend(Protocol[PlanT]):
    """`plan` runs once per call (metadata every layer reuses, of the backend's own type PlanT),
    `attend` once per layer, after the layer's K/V are in the cache.

    q [num_tokens, n_heads, head_dim] → [num_tokens, n_heads, head_dim]; `window` is the layer's
    sliding window (None: full causal), `scale` the softmax scale, `softcap` the attention logit
    softcap (passed, by keyword, only when the layer has one).
    """

    name: str

    def plan(self, cache: PagedKvCache, batch: PagedBatch) -> PlanT: ...

    def attend(
        self,
        cache: PagedKvCache,
        layer_idx: int,
        q: torch.Tensor,
        batch: PagedBatch,
        plan: PlanT,
        window: int | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor: ...
