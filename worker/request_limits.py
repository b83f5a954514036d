"""Bounds on one call, checked before anything in the request is converted or computed.

- Sizes of repeated fields against what the model can use (a block table longer than the paged
  cache, a batch larger than its tokens, a slice past the cache): INVALID_ARGUMENT, without
  touching the entries themselves.
- The working memory of a ForwardPaged call (activations, logits, index tensors and the attention
  backend's bounded transients), estimated from the sizes alone and refused with RESOURCE_EXHAUSTED
  when it exceeds the per-call cap or what the worker's memory budget has left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from registry import Model
from registry.errors import InvalidArgument, OutOfResources

# Bytes a Python int in a list costs (the object and the pointer to it): request fields become lists
# of ints before validation.
PY_INT_BYTES = 36
# The attention backend's transients when the backend module cannot say (see torch_backend).
DEFAULT_ATTENTION_BYTES = 96 << 20


def check_block_tables(lengths: Sequence[int], num_blocks: int) -> None:
    """Each sequence's block table fits the paged cache (checked on the lengths only)."""
    for s, n in enumerate(lengths):
        if n > num_blocks:
            raise InvalidArgument(
                f"block_tables[{s}] has {n} block ids but the model's paged cache has {num_blocks} blocks"
            )


def check_dense_batch(num_tokens: int, batch_size: int) -> None:
    """A Forward's batch_size cannot exceed its tokens (each row needs at least one)."""
    if num_tokens and batch_size > num_tokens:  # no tokens at all: the caller says "empty"
        raise InvalidArgument(
            f"batch_size {batch_size} exceeds len(token_ids) = {num_tokens}: each row needs a token"
        )


def check_slice(model: Model, start_pos: int, length: int) -> None:
    """SliceKvCache's range lies inside the contiguous cache (before any size arithmetic)."""
    limit = model.cache_spec.max_seq_len
    if length > limit or start_pos > limit or start_pos + length > limit:
        raise InvalidArgument(
            f"start_pos {start_pos} + length {length} exceeds the cache's max_seq_len {limit}"
        )


@dataclass(frozen=True)
class CallEstimate:
    total: int
    activations: int
    logits: int
    indices: int
    attention: int

    def describe(self) -> str:
        return (
            f"{self.total} bytes (activations {self.activations}, logits {self.logits}, "
            f"indices {self.indices}, attention {self.attention})"
        )


def paged_call_bytes(
    model: Model, num_tokens: int, num_seqs: int, table_entries: int, max_table: int, logits_rows: int
) -> CallEstimate:
    """Working memory of one ForwardPaged call, from its sizes.

    Activations: per token the hidden state and its norms, q/k/v, the attention output and the MLP's
    gate/up/product (float32 or the model's dtype, whichever is wider), with 2x for the temporaries
    of one layer living next to the residual. Logits: float32 rows, their wire copy and the top-k
    work. Indices: the request's ints as Python lists, the host arrays and the padded device table.
    """
    c = model.config
    width = max(4, model.dtype.itemsize)
    per_token = (
        4 * c.hidden_size
        + (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        + c.num_attention_heads * c.head_dim
        + 3 * c.intermediate_size
        + 2 * c.head_dim  # rotary cos/sin of the call's positions
    )
    activations = 2 * num_tokens * per_token * width
    logits = 3 * logits_rows * c.vocab_size * 4
    indices = (table_entries + 4 * num_tokens + 3 * num_seqs) * PY_INT_BYTES + num_seqs * max_table * (
        8 + 8 + 4
    )
    attention = _attention_bytes()
    return CallEstimate(activations + logits + indices + attention, activations, logits, indices, attention)


def check_call_memory(estimate: CallEstimate, cap: int, budget_left: int | None) -> None:
    """RESOURCE_EXHAUSTED when the call needs more than the per-call cap or the budget's remainder."""
    if estimate.total > cap:
        raise OutOfResources(
            f"this call needs about {estimate.describe()} of working memory, over the per-call cap of "
            f"{cap} bytes (--max-call-bytes); send fewer tokens or sequences, or ask for LOGITS_LAST"
        )
    if budget_left is not None and estimate.total > budget_left:
        raise OutOfResources(
            f"this call needs about {estimate.describe()} of working memory, but the worker's memory "
            f"budget has {max(budget_left, 0)} bytes left after the loaded models"
        )


def _attention_bytes() -> int:
    try:
        from architectures.backends.torch_backend import attention_working_bytes
    except ImportError:
        return DEFAULT_ATTENTION_BYTES
    return attention_working_bytes()


__all__ = [
    "CallEstimate",
    "check_block_tables",
    "check_call_memory",
    "check_dense_batch",
    "check_slice",
    "paged_call_bytes",
]
