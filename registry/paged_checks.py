"""Checks of a `forward_paged` call that need no model: how many tokens each sequence adds.

Shared by the worker (before it queues a call: proto-level lengths) and `prepare_paged_batch` (which
then checks everything that needs the cache and the model), so the two say the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidRequest

QUERY_LENS_DEFAULT_HINT = " (query_lens is empty, so it defaults to context_lens for prefill, 1 for decode)"


def resolve_query_lens(
    context_lens: Sequence[int], query_lens: Sequence[int] | None, is_prefill: bool
) -> tuple[list[int], bool]:
    """(query lengths, whether they were defaulted). The proto's default: the whole context is new
    for prefill, one token for decode. A given list must have one entry per sequence."""
    if query_lens is None or len(query_lens) == 0:
        return (list(context_lens) if is_prefill else [1] * len(context_lens)), True
    if len(query_lens) != len(context_lens):
        raise InvalidRequest(
            f"query_lens has {len(query_lens)} entries but context_lens has {len(context_lens)} sequences"
        )
    return list(query_lens), False


def check_token_count(field: str, count: int, query_lens: Sequence[int], defaulted: bool) -> None:
    """`field` carries one entry per new token: sum(query_lens) of them."""
    total = sum(query_lens)
    if count != total:
        raise InvalidRequest(
            f"the query lengths add up to {total} tokens but {field} has {count} entries"
            + (QUERY_LENS_DEFAULT_HINT if defaulted else "")
        )
