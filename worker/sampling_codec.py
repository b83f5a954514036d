"""SamplingParams / num_draft_tokens from a request (validated before any model work), and the
replies' `outputs`. Every refusal is INVALID_ARGUMENT naming the field and the sequence."""

from __future__ import annotations

import math
from collections.abc import Sequence

from architectures.sampling import GREEDY, MAX_LOGPROBS, SamplingParams, SequenceSample
from registry.errors import InvalidArgument

from .pb.modelworker.v1 import worker_pb2 as pb

# vLLM's bound for the OpenAI penalties.
MAX_PENALTY = 2.0


def sampling_params(messages: Sequence[pb.SamplingParams], count: int, unit: str) -> list[SamplingParams]:
    """One SamplingParams per sequence (`unit`: "sequence" or "batch row"): the request's one per
    sequence, its single one for all, or greedy when there are none."""
    if not messages:
        return [GREEDY] * count
    if len(messages) not in (1, count):
        raise InvalidArgument(
            f"len(sampling) = {len(messages)}: give one SamplingParams per {unit} ({count}) or exactly one for all"
        )
    params = [_params(m, i, unit, len(messages) == 1) for i, m in enumerate(messages)]
    return params * count if len(params) == 1 else params


def _params(m: pb.SamplingParams, i: int, unit: str, shared: bool) -> SamplingParams:
    where = f"(applies to every {unit})" if shared else f"({unit} {i})"

    def bad(name: str, value: float, rule: str) -> InvalidArgument:
        return InvalidArgument(f"sampling[{i}].{name} = {value} {rule} {where}")

    if not (m.temperature >= 0 and math.isfinite(m.temperature)):
        raise bad("temperature", m.temperature, "must be a finite number >= 0 (0 is greedy)")
    for name in ("top_p", "min_p"):
        value = getattr(m, name)
        if not 0 <= value <= 1:
            raise bad(name, value, "must be in [0, 1]")
    if not (m.repetition_penalty >= 0 and math.isfinite(m.repetition_penalty)):
        raise bad("repetition_penalty", m.repetition_penalty, "must be a finite number > 0 (0 or 1: off)")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(m, name)
        if not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise bad(name, value, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
    if m.logprobs > MAX_LOGPROBS:
        raise bad("logprobs", m.logprobs, f"exceeds the maximum of {MAX_LOGPROBS}")
    for name in ("prompt_token_ids", "output_token_ids"):
        ids = getattr(m, name)
        if ids and min(ids) < 0:
            j = next(j for j, t in enumerate(ids) if t < 0)
            raise InvalidArgument(f"sampling[{i}].{name}[{j}] = {ids[j]} is negative {where}")
    return SamplingParams(
        temperature=m.temperature,
        top_k=m.top_k,
        top_p=m.top_p if 0 < m.top_p < 1 else 1.0,
        min_p=m.min_p,
        repetition_penalty=m.repetition_penalty or 1.0,
        presence_penalty=m.presence_penalty,
        frequency_penalty=m.frequency_penalty,
        seed=m.seed if m.HasField("seed") else None,
        prompt_token_ids=tuple(m.prompt_token_ids),
        output_token_ids=tuple(m.output_token_ids),
        logprobs=m.logprobs,
    )


def check_token_ids(messages: Sequence[pb.SamplingParams], vocab: int, unit: str) -> None:
    """Penalty token ids inside the model's vocabulary (known once the model is held)."""
    for i, m in enumerate(messages):
        for name in ("prompt_token_ids", "output_token_ids"):
            ids = getattr(m, name)
            if ids and max(ids) >= vocab:
                j = next(j for j, t in enumerate(ids) if t >= vocab)
                where = f"applies to every {unit}" if len(messages) == 1 else f"{unit} {i}"
                raise InvalidArgument(
                    f"sampling[{i}].{name}[{j}] = {ids[j]} is outside the vocabulary of {vocab} tokens ({where})"
                )


def processed_logprobs(mode: int) -> bool:
    if mode not in (pb.LOGPROBS_RAW, pb.LOGPROBS_PROCESSED):
        raise InvalidArgument(
            f"logprobs_mode {mode} is not a LogprobsMode value (LOGPROBS_RAW, LOGPROBS_PROCESSED)"
        )
    return mode == pb.LOGPROBS_PROCESSED


def draft_counts(values: Sequence[int], query_lens: Sequence[int]) -> list[int]:
    """num_draft_tokens: empty (none), or one per sequence with 0 <= d <= query_len - 1."""
    if not values:
        return [0] * len(query_lens)
    if len(values) != len(query_lens):
        raise InvalidArgument(
            f"len(num_draft_tokens) = {len(values)} must equal the number of sequences {len(query_lens)} "
            "(or be empty)"
        )
    for s, (d, q) in enumerate(zip(values, query_lens, strict=True)):
        if not 0 <= d <= q - 1:
            raise InvalidArgument(
                f"num_draft_tokens[{s}] = {d} must be in [0, query_len - 1 = {q - 1}] (sequence {s}): the "
                "drafts are the last query tokens, after at least one token that is not a draft"
            )
    return list(values)


def draft_tokens(
    input_tokens: Sequence[int], query_lens: Sequence[int], counts: Sequence[int]
) -> list[list[int]]:
    """Each sequence's drafts: the last d of its query tokens."""
    out, end = [], 0
    for q, d in zip(query_lens, counts, strict=True):
        end += q
        out.append(list(input_tokens[end - d : end]))
    return out


def fill_outputs(
    response: pb.ForwardResponse | pb.ForwardPagedResponse, samples: list[SequenceSample]
) -> None:
    """next_token_ids (the last emitted token) and one SequenceOutput per sequence."""
    response.next_token_ids.extend(s.token_ids[-1] for s in samples)
    for s in samples:
        out = response.outputs.add(token_ids=s.token_ids, num_accepted_drafts=s.num_accepted_drafts)
        for lp in s.logprobs:
            out.logprobs.add(
                token_id=lp.token_id,
                logprob=lp.logprob,
                rank=lp.rank,
                top_token_ids=lp.top_token_ids,
                top_logprobs=lp.top_logprobs,
            )
