"""A small continuous-batching scheduler over ForwardPaged: the reference for scheduler authors.

The worker holds the weights and the paged KV cache memory; this scheduler decides everything else:
which sequences run in each step, which cache blocks hold which tokens, and which token comes next.

- `BlockManager` hands out the worker's cache blocks (`kv_num_blocks` blocks of `kv_block_size`
  tokens), keeps a reference count per block, and a prefix cache: a full block whose K/V has been
  computed is registered under a hash of its tokens and of every token before it, so a later prompt
  with the same prefix reuses it instead of computing it again.
- `Scheduler.step` builds one ForwardPaged call out of every running sequence: a decode token each
  (query_len 1) and, in the same call, the prompts admitted in this step (query_len = the tokens
  not yet in the cache, which is fewer than context_len when a prefix was found in the cache). A
  prompt longer than the step's token budget is prefilled in chunks over several steps.
- Sampling happens on the worker: greedy by default (argmax), or `SamplingParams` (temperature,
  top-p, top-k, a seed per sequence), so no logits travel (logits_mode "none").
- Speculative decoding (`num_speculative_tokens` > 0): an n-gram proposer (prompt lookup: the tokens
  that followed the latest earlier occurrence of the sequence's last n tokens) drafts up to k tokens
  per decoding sequence; the worker verifies them in the same call (`num_draft_tokens`) and returns
  the accepted drafts plus one token. Rejected drafts' K/V stay in their slots and are overwritten.
- A sequence that reaches its `max_new_tokens` (or `eos_token_id`) frees its blocks, which the next
  prompts reuse. When blocks run out, the newest sequence is preempted: its blocks are freed and it
  is recomputed later (its prompt blocks are usually still in the prefix cache), or, with
  `preempt="swap"`, its blocks are first copied to host memory (ExportKvBlocks) and written back
  into whatever blocks are free when it resumes (ImportKvBlocks), so nothing is recomputed.
- Disaggregated prefill (`prefill_client`, `--prefill-address`): new prompts are prefilled on another
  worker with the same model and cache layout, their blocks moved here, and only decoded here.

Run against a worker (the worker has no tokenizer, so prompts are token ids):

    python examples/continuous_batching.py --address localhost:50051 --model smollm2-135m
    python examples/continuous_batching.py --model smollm2-135m --prompt 504,3575,282,4649,314 -n 16
    python examples/continuous_batching.py --prefill-address localhost:50052 --model smollm2-135m
    python examples/continuous_batching.py --model smollm2-135m --num-blocks 12 --preempt swap

or from Python: `run(client, "smollm2-135m", [[504, 3575, 282, 4649, 314], ...], max_new_tokens=16)`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.client import KvBlocks, ModelInfo, ModelWorkerClient, ModelWorkerClientError, SamplingParams

# SmolLM2 token ids of a few prompts (the first four share an 18-token prefix: "A short list of
# facts about the planets of the solar system, one per line.\n"), used when no --prompt is given.
_PLANETS = [49, 1890, 1398, 282, 5307, 563, 260, 9244, 282, 260, 3693, 817, 28, 582, 567, 1761, 30, 198]
DEFAULT_PROMPTS: list[list[int]] = [
    _PLANETS + [61, 9532, 314],  # ... Mercury is
    _PLANETS + [38103, 376, 314],  # ... Venus is
    _PLANETS + [18458, 314],  # ... Earth is
    _PLANETS + [38861, 314],  # ... Mars is
    [504, 3575, 282, 4649, 314],  # The capital of France is
    [1604, 3987, 46477, 24, 94, 727],  # def fibonacci(n):
    [6403, 1980, 253, 655, 28, 281, 253, 1165, 6560, 28],  # Once upon a time, in a small village,
]


# -- blocks ----------------------------------------------------------------------------------------
def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: its tokens and (through `parent`) every token before."""
    return hashlib.sha256(parent + np.asarray(tokens, dtype=np.int64).tobytes()).digest()


@dataclass
class BlockStats:
    allocations: int = 0  # blocks handed out for new content
    reuses: int = 0  # ... of which had held another sequence's tokens before
    prefix_hits: int = 0  # blocks shared from the prefix cache instead of computed
    peak_used: int = 0


class BlockManager:
    """The scheduler's view of the worker's paged cache.

    Free blocks wait in least-recently-freed order. A block keeps its prefix-cache entry after its
    last sequence frees it; the entry is dropped only when the block is handed out for new content.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # prefix hash → block id
        self.hash_of: dict[int, bytes] = {}  # block id → its prefix hash, while registered
        self.ever_used: set[int] = set()
        self.stats = BlockStats()

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block_id, None)
        if old is not None:  # evict: the block is about to hold other tokens
            del self.cached[old]
        self.ref_counts[block_id] = 1
        self.stats.allocations += 1
        self.stats.reuses += block_id in self.ever_used
        self.ever_used.add(block_id)
        self.stats.peak_used = max(self.stats.peak_used, self.num_used)
        return block_id

    def share(self, block_id: int) -> None:
        """Take one more reference to a cached block (it may be on the free list)."""
        if self.ref_counts[block_id] == 0:
            del self.free[block_id]
        self.ref_counts[block_id] += 1
        self.stats.prefix_hits += 1
        self.stats.peak_used = max(self.stats.peak_used, self.num_used)

    def release(self, block_ids: Sequence[int]) -> None:
        # Last block first, so a prompt's tail is evicted before the prefix it hangs off.
        for block_id in reversed(block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free[block_id] = None

    def lookup(self, key: bytes) -> int | None:
        return self.cached.get(key)

    def register(self, block_id: int, key: bytes) -> None:
        """Publish a full, computed block. If the same content is cached already (computed twice in
        one step), the first copy stays the cached one."""
        if key not in self.cached and block_id not in self.hash_of:
            self.cached[key] = block_id
            self.hash_of[block_id] = key


# -- sequences -------------------------------------------------------------------------------------
@dataclass
class Request:
    """One prompt's generation as the scheduler tracks it."""

    index: int
    prompt: list[int]
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    num_computed: int = 0  # tokens whose K/V are in the worker's cache
    blocks: list[int] = field(default_factory=list)  # the block table
    hashes: list[bytes] = field(default_factory=list)  # prefix hash of each full block of `tokens`
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    admitted_step: int = -1
    finished_step: int = -1
    preemptions: int = 0
    swapped: KvBlocks | None = None  # its first num_computed tokens' blocks, while swapped out

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    def full_block_hashes(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Prefix hashes of the first `num_blocks` blocks (extending the memo as tokens arrive)."""
        while len(self.hashes) < num_blocks:
            j = len(self.hashes)
            parent = self.hashes[-1] if self.hashes else b""
            self.hashes.append(block_hash(parent, self.tokens[j * block_size : (j + 1) * block_size]))
        return self.hashes[:num_blocks]


@dataclass(frozen=True)
class SequenceResult:
    prompt: list[int]
    tokens: list[int]  # generated, greedy
    cached_prompt_tokens: int  # reused from the prefix cache instead of computed
    admitted_step: int
    finished_step: int
    preemptions: int


@dataclass
class RunStats:
    steps: int = 0
    prefill_steps: int = 0  # only prompt tokens
    decode_steps: int = 0  # one token per sequence (is_prefill false)
    mixed_steps: int = 0  # prompts admitted while others decode, in one call
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0  # prefill work done (recomputation after preemption included)
    generated_tokens: int = 0
    draft_tokens: int = 0  # proposed by the n-gram proposer and sent for verification
    accepted_draft_tokens: int = 0
    preemptions: int = 0
    max_running: int = 0
    num_blocks: int = 0
    block_size: int = 0
    peak_blocks_used: int = 0
    mean_blocks_used: float = 0.0
    blocks_allocated: int = 0
    blocks_reused: int = 0  # allocations of a block another sequence had used
    prefix_hit_blocks: int = 0
    swaps_out: int = 0  # preemptions that kept the blocks in host memory
    swaps_in: int = 0
    swapped_bytes: int = 0  # K/V bytes exported by swaps out
    remote_prefills: int = 0  # prompts prefilled on the prefill worker
    transferred_bytes: int = 0  # K/V bytes moved from the prefill worker
    elapsed_seconds: float = 0.0
    worker_compute_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time, prompt processing included."""
        return self.generated_tokens / self.elapsed_seconds if self.elapsed_seconds else 0.0


@dataclass(frozen=True)
class RunResult:
    outputs: list[list[int]]  # generated tokens, one list per prompt, in prompt order
    sequences: list[SequenceResult]
    stats: RunStats


@dataclass(frozen=True)
class Batch:
    """One step's ForwardPaged call: which sequences run and how many new tokens each brings."""

    seqs: list[Request]
    query_lens: list[int]  # drafts included
    drafts: list[list[int]]  # the last len(drafts[i]) query tokens of sequence i are drafts


def propose_ngram(tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the up-to-k tokens that followed the latest earlier occurrence of the last n
    tokens (n = max_ngram down to min_ngram); [] when no such suffix occurred before."""
    if k <= 0:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = list(tokens[-n:])
        for start in range(len(tokens) - n - 1, -1, -1):
            if list(tokens[start : start + n]) == suffix:
                return list(tokens[start + n : start + n + k])
    return []


class RemotePrefill:
    """Prefill on another worker, then move the prompt's blocks (disaggregated prefill).

    The prefill worker is used for prefill only, one prompt at a time, in its blocks 0..k-1; its
    model must have the decode worker's cache layout (same checkpoint, dtype and block size), which
    ImportKvBlocks checks (FAILED_PRECONDITION otherwise)."""

    def __init__(self, client: ModelWorkerClient, model: ModelInfo, decode_model: ModelInfo) -> None:
        if model.kv_block_size != decode_model.kv_block_size:
            raise ValueError(
                f"the prefill worker's {model.id!r} has blocks of {model.kv_block_size} tokens, the decode "
                f"worker's {decode_model.id!r} of {decode_model.kv_block_size}: the KV layouts must match"
            )
        self.client = client
        self.model = model

    def run(
        self, tokens: list[int], dst: ModelWorkerClient, dst_model_id: str, dst_blocks: list[int]
    ) -> tuple[int, int]:
        """Prefill `tokens`, copy their blocks (the last one partly filled) into `dst_blocks` of the
        decode worker, chunk by chunk through this process; the token after `tokens` and the bytes moved."""
        bs, n = self.model.kv_block_size, len(tokens)
        table = list(range(-(-n // bs)))
        if len(table) > self.model.kv_num_blocks:
            raise ValueError(
                f"{n} tokens need {len(table)} blocks; the prefill worker has {self.model.kv_num_blocks}"
            )
        out = self.client.forward_paged(
            self.model.id,
            tokens,
            list(range(n)),
            [table],
            [table[i // bs] * bs + i % bs for i in range(n)],
            [n],
            is_prefill=True,
            logits_mode="none",
        )
        moved = self.client.copy_kv_blocks(self.model.id, table, dst, dst_model_id, dst_blocks)
        return out.next_token_ids[0], moved.bytes


# -- the scheduler ---------------------------------------------------------------------------------
class Scheduler:
    """FCFS continuous batching with chunked prefill, prefix caching and preemption by recompute."""

    def __init__(
        self,
        client: ModelWorkerClient,
        model: ModelInfo,
        *,
        max_num_seqs: int,
        max_batch_tokens: int,
        num_blocks: int,
        eos_token_id: int | None = None,
        log: Callable[[str], None] | None = None,
        sampling: SamplingParams | None = None,
        num_speculative_tokens: int = 0,
        preempt: str = "recompute",
        prefill: RemotePrefill | None = None,
    ) -> None:
        if preempt not in ("recompute", "swap"):
            raise ValueError(f"preempt must be recompute or swap, got {preempt!r}")
        self.preempt_mode = preempt
        self.prefill = prefill
        self.client = client
        self.sampling = sampling
        self.num_speculative_tokens = num_speculative_tokens
        self.model_id = model.id
        self.block_size = model.kv_block_size
        self.blocks = BlockManager(num_blocks, self.block_size)
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.eos_token_id = eos_token_id
        self.log = log
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is preempted first
        self.finished: list[Request] = []
        self.stats = RunStats(num_blocks=num_blocks, block_size=self.block_size)
        self._used_sum = 0

    def add(self, seq: Request) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    # -- scheduling ------------------------------------------------------------------------------
    def _grow(self, seq: Request, num_tokens: int) -> bool:
        """Give `seq` blocks for its first `num_tokens` tokens; False when there are not enough."""
        need = self.blocks.blocks_for(num_tokens) - len(seq.blocks)
        if need > self.blocks.num_free:
            return False
        seq.blocks.extend(self.blocks.allocate() for _ in range(need))
        return True

    def _preempt(self, seq: Request) -> None:
        """Free the sequence's blocks and queue it first; it is recomputed from its tokens later, or
        (swap) its computed blocks wait in host memory until it resumes."""
        self.running.remove(seq)
        if self.preempt_mode == "swap" and seq.num_computed:
            kept = seq.blocks[: self.blocks.blocks_for(seq.num_computed)]
            seq.swapped = self.client.export_kv_blocks(self.model_id, kept)
            self.stats.swaps_out += 1
            self.stats.swapped_bytes += seq.swapped.nbytes
        self.blocks.release(seq.blocks)
        seq.blocks = []
        if seq.swapped is None:
            seq.num_computed = 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def _prefix_hits(self, seq: Request, in_flight: set[bytes]) -> list[int] | None:
        """Cached blocks that hold a prefix of `seq`, or None when the next block of its prefix is
        being computed in this very step (waiting one step then saves computing it twice). At least
        the last token is always computed, since the worker returns logits only for new tokens."""
        limit = (len(seq.tokens) - 1) // self.block_size
        hits: list[int] = []
        for key in seq.full_block_hashes(self.block_size, limit):
            block_id = self.blocks.lookup(key)
            if block_id is None:
                return None if key in in_flight else hits
            hits.append(block_id)
        return hits

    def _completed_hashes(self, seq: Request, query_len: int) -> list[bytes]:
        """Prefix hashes of the full blocks this step's tokens of `seq` complete."""
        first = seq.num_computed // self.block_size
        last = (seq.num_computed + query_len) // self.block_size
        return seq.full_block_hashes(self.block_size, last)[first:]

    def schedule(self) -> Batch:
        seqs: list[Request] = []
        query_lens: list[int] = []
        drafts: list[list[int]] = []
        budget = self.max_batch_tokens
        in_flight: set[bytes] = set()

        # 1. Running sequences first, oldest first: a decode token, or the next chunk of a prompt.
        for seq in list(self.running):
            if seq not in self.running or budget == 0:
                continue  # preempted below on behalf of an older sequence, or no budget left
            q = min(len(seq.tokens) - seq.num_computed, budget)
            draft = self._propose(seq, budget) if q == len(seq.tokens) - seq.num_computed == 1 else []
            q += len(draft)
            while not self._grow(seq, seq.num_computed + q):
                self._preempt(self.running[-1])
                if seq not in self.running:
                    break
            if seq in self.running:
                seqs.append(seq)
                query_lens.append(q)
                drafts.append(draft)
                budget -= q
                in_flight.update(self._completed_hashes(seq, q - len(draft)))

        # 2. Admit waiting prompts while there is budget, a seat and memory; prefix hits are free.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.swapped is not None or self.prefill is not None:
                q = self._admit_with_blocks(seq, budget)
                if q is None:
                    break
                if q:  # a swapped-in sequence continues in this step
                    seqs.append(seq)
                    query_lens.append(q)
                    drafts.append([])
                    budget -= q
                    in_flight.update(self._completed_hashes(seq, q))
                continue
            hits = self._prefix_hits(seq, in_flight)
            if hits is None:
                break
            cached = len(hits) * self.block_size
            q = min(len(seq.tokens) - cached, budget)
            revived = sum(self.blocks.ref_counts[b] == 0 for b in hits)  # cached blocks now on the free list
            if self.blocks.blocks_for(cached + q) - len(hits) + revived > self.blocks.num_free:
                break
            self.waiting.popleft()
            for block_id in hits:
                self.blocks.share(block_id)
            seq.blocks = list(hits)
            seq.num_computed = cached
            self._grow(seq, cached + q)
            if seq.admitted_step < 0:
                seq.admitted_step = self.stats.steps
                seq.cached_prompt_tokens = min(cached, len(seq.prompt))
            self.running.append(seq)
            seqs.append(seq)
            query_lens.append(q)
            drafts.append([])
            budget -= q
            in_flight.update(self._completed_hashes(seq, q))
        return Batch(seqs, query_lens, drafts)

    def _propose(self, seq: Request, budget: int) -> list[int]:
        """Drafts for a decoding sequence: never past its max_new_tokens (the last token is never fed
        back) nor the step's token budget."""
        room = min(self.num_speculative_tokens, seq.max_new_tokens - len(seq.generated) - 1, budget - 1)
        # A single matching token predicts poorly; two or more are worth a verification.
        return propose_ngram(seq.tokens, room, min_ngram=2)

    def _sampling(self, seqs: list[Request]) -> list[SamplingParams] | None:
        """One SamplingParams per sequence; a seed becomes seed + the prompt's index, so each
        sequence has its own reproducible stream whatever it is batched with."""
        if self.sampling is None:
            return None
        if self.sampling.seed is None:
            return [self.sampling] * len(seqs)
        return [dataclasses.replace(self.sampling, seed=self.sampling.seed + seq.index) for seq in seqs]

    def _admit_with_blocks(self, seq: Request, budget: int) -> int | None:
        """Admit a sequence whose K/V comes from elsewhere: its swapped-out blocks, or a prefill on the
        prefill worker. Returns its query length in this step (0: prefilled remotely, it decodes from
        the next step), or None when the free blocks do not suffice."""
        if seq.swapped is not None:
            q = min(len(seq.tokens) - seq.num_computed, budget)
            need = self.blocks.blocks_for(seq.num_computed + q)
        else:
            q, need = 0, self.blocks.blocks_for(len(seq.tokens))
        if need > self.blocks.num_free:
            return None
        self.waiting.popleft()
        seq.blocks = [self.blocks.allocate() for _ in range(need)]
        if seq.admitted_step < 0:
            seq.admitted_step = self.stats.steps
        self.running.append(seq)
        if seq.swapped is not None:
            self.client.import_kv_blocks(self.model_id, seq.blocks[: len(seq.swapped.block_ids)], seq.swapped)
            seq.swapped = None
            self.stats.swaps_in += 1
            return q
        assert self.prefill is not None
        next_token, moved = self.prefill.run(seq.tokens, self.client, self.model_id, seq.blocks)
        self.stats.remote_prefills += 1
        self.stats.transferred_bytes += moved
        seq.num_computed = len(seq.tokens)
        self._append(seq, next_token)
        return 0

    def _append(self, seq: Request, next_token: int) -> None:
        """A sequence's next token; it finishes at max_new_tokens or eos and frees its blocks."""
        seq.tokens.append(next_token)
        self.stats.generated_tokens += 1
        if len(seq.generated) >= seq.max_new_tokens or next_token == self.eos_token_id:
            self.running.remove(seq)
            self.blocks.release(seq.blocks)
            seq.blocks = []
            seq.finished_step = self.stats.steps
            self.finished.append(seq)

    # -- one step --------------------------------------------------------------------------------
    def step(self) -> None:
        admitted = self.stats.remote_prefills
        batch = self.schedule()
        if not batch.seqs and self.stats.remote_prefills > admitted:
            return  # prompts were prefilled on the prefill worker; they decode from the next step
        if not batch.seqs:
            raise RuntimeError(
                f"nothing could be scheduled: {len(self.waiting)} waiting, {len(self.running)} running, "
                f"{self.blocks.num_free}/{self.blocks.num_blocks} blocks free"
            )
        bs = self.block_size
        input_tokens: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        context_lens: list[int] = []
        for seq, q, draft in zip(batch.seqs, batch.query_lens, batch.drafts, strict=True):
            # The new tokens are the last q of the sequence's context: [num_computed, num_computed + q),
            # its known tokens, then its drafts.
            for i in range(seq.num_computed, seq.num_computed + q):
                input_tokens.append(seq.tokens[i] if i < len(seq.tokens) else draft[i - len(seq.tokens)])
                positions.append(i)
                slot_mapping.append(seq.blocks[i // bs] * bs + i % bs)
            context_lens.append(seq.num_computed + q)
        is_prefill = any(q != 1 for q in batch.query_lens)
        result = self.client.forward_paged(
            self.model_id,
            input_tokens,
            positions,
            [seq.blocks for seq in batch.seqs],
            slot_mapping,
            context_lens,
            is_prefill=is_prefill,
            # Optional in a decode call (every query_len is 1); a prefill call with a cached prefix
            # or a mix of prompts and decodes needs it.
            query_lens=batch.query_lens if is_prefill else None,
            logits_mode="none",
            sampling=self._sampling(batch.seqs),
            num_draft_tokens=[len(d) for d in batch.drafts] if any(batch.drafts) else None,
        )
        self._account(batch, result.compute_seconds)

        for seq, q, draft, out in zip(
            batch.seqs, batch.query_lens, batch.drafts, result.outputs, strict=True
        ):
            # Valid K/V: the known tokens and the accepted drafts (rejected ones are overwritten later).
            computed = q - len(draft) + out.num_accepted_drafts
            caught_up = seq.num_computed + q - len(draft) == len(seq.tokens)
            if caught_up:  # not a prompt chunk: the emitted tokens are new
                seq.tokens.extend(out.token_ids)
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_draft_tokens += out.num_accepted_drafts
            # Publish the blocks this step filled, so later prompts can share them.
            for j, key in enumerate(self._completed_hashes(seq, computed), start=seq.num_computed // bs):
                self.blocks.register(seq.blocks[j], key)
            seq.num_computed += computed
            if not caught_up:
                continue  # a prompt chunk: the token after it is already known
            emitted = list(out.token_ids)
            if self.eos_token_id in emitted:
                emitted = emitted[: emitted.index(self.eos_token_id) + 1]
            emitted = emitted[: seq.max_new_tokens - (len(seq.generated) - len(out.token_ids))]
            del seq.tokens[len(seq.tokens) - len(out.token_ids) + len(emitted) :]
            self.stats.generated_tokens += len(emitted)
            if len(seq.generated) >= seq.max_new_tokens or emitted[-1] == self.eos_token_id:
                self.running.remove(seq)
                self.blocks.release(seq.blocks)
                seq.blocks = []
                seq.finished_step = self.stats.steps
                self.finished.append(seq)
        self.stats.steps += 1

    def _account(self, batch: Batch, compute_seconds: float) -> None:
        s = self.stats
        decodes = sum(
            q - len(d) == 1 and seq.num_computed + 1 == len(seq.tokens) and len(seq.tokens) > len(seq.prompt)
            for seq, q, d in zip(batch.seqs, batch.query_lens, batch.drafts, strict=True)
        )
        if decodes == len(batch.seqs):
            s.decode_steps += 1
        elif decodes:
            s.mixed_steps += 1
        else:
            s.prefill_steps += 1
        s.prompt_tokens_computed += sum(batch.query_lens) - decodes - sum(len(d) for d in batch.drafts)
        s.max_running = max(s.max_running, len(self.running))
        s.worker_compute_seconds += compute_seconds
        self._used_sum += self.blocks.num_used
        if self.log:
            self.log(
                f"step {s.steps:4d}: {len(batch.seqs) - decodes} prefill ({sum(batch.query_lens) - decodes} tokens)"
                f" + {decodes} decode, blocks {self.blocks.num_used}/{self.blocks.num_blocks} used,"
                f" {len(self.waiting)} waiting"
            )

    def finish_stats(self, elapsed: float) -> RunStats:
        s = self.stats
        b = self.blocks.stats
        s.elapsed_seconds = elapsed
        s.peak_blocks_used = b.peak_used
        s.mean_blocks_used = self._used_sum / s.steps if s.steps else 0.0
        s.blocks_allocated = b.allocations
        s.blocks_reused = b.reuses
        s.prefix_hit_blocks = b.prefix_hits
        return s


def find_model(client: ModelWorkerClient, model_id: str) -> ModelInfo:
    for info in client.list_models():
        if info.id == model_id:
            if info.state != "READY":
                raise RuntimeError(f"model {model_id!r} is {info.state}, not READY")
            return info
    raise RuntimeError(f"model {model_id!r} is not loaded on the worker (load it first, or pass --load DIR)")


def run(
    client: ModelWorkerClient,
    model_id: str,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int] = 16,
    *,
    max_num_seqs: int = 8,
    max_batch_tokens: int = 256,
    num_blocks: int | None = None,
    eos_token_id: int | None = None,
    log: Callable[[str], None] | None = None,
    preempt: str = "recompute",
    prefill_client: ModelWorkerClient | None = None,
    prefill_model_id: str | None = None,
    sampling: SamplingParams | None = None,
    num_speculative_tokens: int = 0,
) -> RunResult:
    """Generate for every prompt with continuous batching; returns the generated tokens in prompt
    order and the run's statistics. `num_blocks` uses fewer blocks than the worker has (to see reuse
    and preemption on a small budget); `log` gets one line per step. `preempt`: "recompute" or "swap"
    (blocks to host memory and back). `prefill_client`: prefill prompts on that worker (model
    `prefill_model_id`, default `model_id`) and decode here. `sampling`: None is greedy;
    `num_speculative_tokens`: n-gram drafts per decoding sequence and step (0: none)."""
    model = find_model(client, model_id)
    prefill = None
    if prefill_client is not None:
        prefill = RemotePrefill(
            prefill_client, find_model(prefill_client, prefill_model_id or model_id), model
        )
    info = client.info()
    limits = [model.kv_num_blocks] + ([num_blocks] if num_blocks else [])
    num_blocks = min(limits)
    max_num_seqs = min(max_num_seqs, info.limits.max_batch_size or max_num_seqs)
    max_batch_tokens = min(max_batch_tokens, info.limits.max_tokens_per_request or max_batch_tokens)
    new_tokens = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(new_tokens) != len(prompts):
        raise ValueError(f"{len(new_tokens)} max_new_tokens values for {len(prompts)} prompts")
    if max_num_seqs < 1 or max_batch_tokens < 1:
        raise ValueError("max_num_seqs and max_batch_tokens must be at least 1")

    scheduler = Scheduler(
        client,
        model,
        max_num_seqs=max_num_seqs,
        max_batch_tokens=max_batch_tokens,
        num_blocks=num_blocks,
        eos_token_id=eos_token_id,
        log=log,
        sampling=sampling,
        num_speculative_tokens=num_speculative_tokens,
        preempt=preempt,
        prefill=prefill,
    )
    seqs = []
    for i, (prompt, n) in enumerate(zip(prompts, new_tokens, strict=True)):
        prompt = [int(t) for t in prompt]
        # The last generated token is never fed back, so the cache holds len(prompt) + n - 1 tokens.
        stored = len(prompt) + n - 1
        # Checked up front: a sequence that can never fit would stall the loop forever.
        if not prompt or n < 1:
            raise ValueError(f"prompt {i}: needs at least one token and max_new_tokens >= 1")
        if stored > model.max_position_embeddings:
            raise ValueError(
                f"prompt {i}: {len(prompt)} + {n} tokens reach position {stored - 1}, beyond "
                f"max_position_embeddings {model.max_position_embeddings}"
            )
        if scheduler.blocks.blocks_for(stored) > num_blocks:
            raise ValueError(
                f"prompt {i}: {len(prompt)} + {n} tokens need {scheduler.blocks.blocks_for(stored)} blocks "
                f"of {model.kv_block_size}, the cache has {num_blocks}"
            )
        seq = Request(index=i, prompt=prompt, max_new_tokens=n, tokens=list(prompt))
        seqs.append(seq)
        scheduler.add(seq)
    scheduler.stats.prompt_tokens = sum(len(s.prompt) for s in seqs)

    started = time.perf_counter()
    while not scheduler.done:
        scheduler.step()
    stats = scheduler.finish_stats(time.perf_counter() - started)
    results = [
        SequenceResult(
            s.prompt, s.generated, s.cached_prompt_tokens, s.admitted_step, s.finished_step, s.preemptions
        )
        for s in seqs
    ]
    return RunResult([r.tokens for r in results], results, stats)


# -- the script ------------------------------------------------------------------------------------
def random_prompts(vocab_size: int, count: int, seed: int) -> list[list[int]]:
    """Prompts of different lengths for a model whose vocabulary the default prompts do not fit;
    half of them share a prefix."""
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(20)]
    out = []
    for i in range(count):
        tail = [rng.randrange(vocab_size) for _ in range(rng.randint(3, 24))]
        out.append(prefix + tail if i % 2 == 0 else tail)
    return out


def parse_prompt(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a prompt is token ids separated by commas, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Greedy generation with continuous batching over ForwardPaged."
    )
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--model", default="smollm2-135m", help="model id on the worker")
    parser.add_argument("--load", metavar="DIR", help="load the model from DIR (inside a model root) first")
    parser.add_argument(
        "--prompt", action="append", type=parse_prompt, help="token ids, e.g. 1,2,3 (repeatable)"
    )
    parser.add_argument("-n", "--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-batch-tokens", type=int, default=256)
    parser.add_argument("--num-blocks", type=int, help="use at most this many of the worker's blocks")
    parser.add_argument("--eos", type=int, help="stop a sequence at this token id")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, help="seed of prompt i: SEED + i (reproducible sampling)")
    parser.add_argument(
        "--speculative", type=int, default=0, metavar="K", help="n-gram (prompt lookup) drafts per step"
    )
    parser.add_argument(
        "--preempt", choices=("recompute", "swap"), default="recompute",
        help="a preempted sequence is recomputed, or its blocks wait in host memory (export/import)",
    )  # fmt: skip
    parser.add_argument("--prefill-address", help="prefill prompts on this worker, move their KV blocks here")
    parser.add_argument("--prefill-model", help="model id on the prefill worker (default: --model)")
    parser.add_argument("--auth-token")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call in seconds")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per step")
    args = parser.parse_args(argv)

    try:
        with (
            ModelWorkerClient(args.address, timeout=args.timeout, auth_token=args.auth_token) as client,
            contextlib.ExitStack() as stack,
        ):
            prefill_client = None
            if args.prefill_address:
                prefill_client = ModelWorkerClient(
                    args.prefill_address, timeout=args.timeout, auth_token=args.auth_token
                )
                stack.callback(prefill_client.close)
            if args.load:
                client.load(args.model, args.load)
                if prefill_client is not None:
                    prefill_client.load(args.prefill_model or args.model, args.load)
            model = find_model(client, args.model)
            prompts = args.prompt or DEFAULT_PROMPTS
            if not args.prompt and max(max(p) for p in prompts) >= model.vocab_size:
                print(f"the default prompts do not fit a vocabulary of {model.vocab_size}: random prompts")
                prompts = random_prompts(model.vocab_size, 8, seed=0)
            result = run(
                client,
                args.model,
                prompts,
                args.max_new_tokens,
                max_num_seqs=args.max_num_seqs,
                max_batch_tokens=args.max_batch_tokens,
                num_blocks=args.num_blocks,
                eos_token_id=args.eos,
                log=print if args.verbose else None,
                sampling=SamplingParams(
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
                )
                if args.temperature > 0
                else None,
                num_speculative_tokens=args.speculative,
                preempt=args.preempt,
                prefill_client=prefill_client,
                prefill_model_id=args.prefill_model,
            )
    except (ModelWorkerClientError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    for i, seq in enumerate(result.sequences):
        print(
            f"prompt {i} ({len(seq.prompt)} tokens, {seq.cached_prompt_tokens} from the prefix cache): {seq.tokens}"
        )
    s = result.stats
    print(
        f"{s.generated_tokens} tokens in {s.elapsed_seconds:.2f} s: {s.tokens_per_second:.1f} tokens/s "
        f"({s.worker_compute_seconds:.2f} s in the model); {s.steps} steps: {s.prefill_steps} prefill, "
        f"{s.mixed_steps} mixed, {s.decode_steps} decode; up to {s.max_running} sequences at once"
    )
    print(
        f"blocks of {s.block_size} tokens: peak {s.peak_blocks_used}/{s.num_blocks} used, mean "
        f"{s.mean_blocks_used:.1f}; {s.blocks_allocated} allocated ({s.blocks_reused} reused after "
        f"another sequence), {s.prefix_hit_blocks} shared from the prefix cache; {s.preemptions} preemptions; "
        f"prompt tokens computed {s.prompt_tokens_computed} of {s.prompt_tokens}"
    )
    if args.speculative:
        print(
            f"speculative decoding: {s.accepted_draft_tokens} of {s.draft_tokens} n-gram drafts accepted "
            f"({s.acceptance_rate:.1%})"
        )
    if s.swaps_out or s.remote_prefills:
        print(
            f"KV transfer: {s.swaps_out} swaps out / {s.swaps_in} in ({s.swapped_bytes} bytes to host); "
            f"{s.remote_prefills} prompts prefilled on the prefill worker ({s.transferred_bytes} bytes moved)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
