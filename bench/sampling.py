"""Item 10: sampling on the worker. The sampler's cost per decode step (every filter and penalty on)
against greedy and against the step itself; the bytes and gRPC time a batch-64 decode step saves
with LOGITS_NONE + sampling instead of LOGITS_LAST float32; and n-gram speculative decoding in the
example scheduler on a repetitive prompt."""

from __future__ import annotations

import time

import grpc
import torch

from architectures.sampling import Sampler, SamplingParams
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.pb.modelworker.v1 import worker_pb2_grpc as pb_grpc

from .common import Case, Goal, Row, Stats, alternate, paired_difference, ratio
from .context import Bench
from .inprocess import copy_blocks, paged_prefill
from .models import BENCH_KV, BLOCK_SIZE, DECODE_CONTEXT
from .serving import WorkerProcess, kv_config

BATCHES = (1, 16, 64)
CONTEXT = 64  # tokens per sequence at the timed step (4 blocks: 64 sequences fit in BENCH_KV)
WIRE_BATCH = 64
SPEC_TOKENS = 4
SPEC_NEW = 64


def all_filters(batch: int, vocab: int, seeded: bool) -> list[SamplingParams]:
    """Every filter and penalty on (temperature, top_k, top_p, min_p, repetition, presence,
    frequency over 64 tokens of context); half of the sequences seeded."""
    gen = torch.Generator().manual_seed(batch)
    out = []
    for s in range(batch):
        out.append(
            SamplingParams(
                temperature=0.8,
                top_k=50,
                top_p=0.9,
                min_p=0.05,
                repetition_penalty=1.1,
                presence_penalty=0.2,
                frequency_penalty=0.2,
                seed=s if seeded and s % 2 == 0 else None,
                prompt_token_ids=tuple(torch.randint(0, vocab, (CONTEXT - 16,), generator=gen).tolist()),
                output_token_ids=tuple(torch.randint(0, vocab, (16,), generator=gen).tolist()),
            )
        )
    return out


def sampling_cost(b: Bench) -> None:
    """Item 10, in process: a decode step of `batch` sequences at context 64 (forward_paged), the
    sampler on its logits with every filter on, and greedy's argmax."""
    model = b.smol
    ours = b.ours[model.label]
    vocab = ours.config.vocab_size
    per_seq = CONTEXT // BLOCK_SIZE
    first = DECODE_CONTEXT // BLOCK_SIZE  # after item 3's blocks, like item 4
    tables = [[first + s * per_seq + j for j in range(per_seq)] for s in range(max(BATCHES))]
    paged_prefill(ours, b.tokens(model, 1, CONTEXT - 1)[0], tables[0])
    copy_blocks(ours, tables[0], tables[1:])
    sampler = Sampler(seed=0)
    last = CONTEXT - 1
    for batch in BATCHES:
        tokens = b.tokens(model, batch)
        positions = torch.full((batch,), last, dtype=torch.long)
        slots = torch.tensor([t[last // BLOCK_SIZE] * BLOCK_SIZE + last % BLOCK_SIZE for t in tables[:batch]])
        lens = [CONTEXT] * batch

        def step(tokens=tokens, positions=positions, slots=slots, lens=lens, batch=batch) -> torch.Tensor:
            return ours.forward_paged(tokens, positions, tables[:batch], slots, lens, False)

        with torch.inference_mode():
            logits = step()
        params = all_filters(batch, vocab, seeded=True)
        cases = [
            Case("step", step),
            Case(
                "sample", lambda logits=logits, params=params, lens=lens: sampler.sample(logits, params, lens)
            ),
            Case("greedy", lambda logits=logits: logits.argmax(dim=-1).tolist()),
        ]
        with torch.inference_mode():
            stats = alternate(cases, b.budget(6.0), min_reps=5, max_reps=200, warmup=2)
        sample, greedy, step_s = stats["sample"], stats["greedy"], stats["step"]
        b.report.add(
            Row(
                f"10. Sampling cost per decode step, batch {batch} × context {CONTEXT}, every filter "
                f"and penalty, {model.label}",
                f"{sample.fmt()} ({ratio(sample, step_s):.1%} of the step)",
                f"greedy argmax {greedy.fmt('µs')}; the step {step_s.fmt()}",
                ratio(sample, step_s),
                Goal(0.10, text="≤ 10% of the step at batch 64") if batch == 64 else "report",
                key=f"sampling-cost-{batch}",
                spread=(sample, step_s),
            )
        )


def wire_bytes(b: Bench, worker: WorkerProcess) -> None:
    """Item 10, over gRPC: a decode step of 64 sequences (context 1 each) answered as LOGITS_LAST
    float32 (the scheduler samples) or LOGITS_NONE with sampling on the worker: reply bytes, and the
    time the RPC adds to the model call (paired per call with its compute_seconds)."""
    model = b.smol
    model_id = "smol-sampling"
    worker.client.load(model_id, model.path, kv_cache=kv_config(BENCH_KV))
    channel = grpc.insecure_channel(worker.target, options=[("grpc.max_receive_message_length", 1 << 30)])
    stub = pb_grpc.ModelWorkerStub(channel)
    vocab = b.ours[model.label].config.vocab_size
    sampling = [
        pb.SamplingParams(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            min_p=p.min_p,
            repetition_penalty=p.repetition_penalty,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            prompt_token_ids=p.prompt_token_ids,
            output_token_ids=p.output_token_ids,
        )
        for p in all_filters(WIRE_BATCH, vocab, seeded=False)
    ]
    tokens = b.tokens(model, WIRE_BATCH).tolist()
    base = dict(
        model_id=model_id,
        input_tokens=tokens,
        positions=[0] * WIRE_BATCH,
        block_tables=[pb.BlockTable(block_ids=[s]) for s in range(WIRE_BATCH)],
        slot_mapping=[s * BLOCK_SIZE for s in range(WIRE_BATCH)],
        context_lens=[1] * WIRE_BATCH,
    )
    requests = {
        "LOGITS_LAST float32": pb.ForwardPagedRequest(logits_mode=pb.LOGITS_LAST, **base),
        "LOGITS_NONE + sampling": pb.ForwardPagedRequest(
            logits_mode=pb.LOGITS_NONE, sampling=sampling, **base
        ),
    }
    sizes: dict[str, int] = {}
    compute: dict[str, list[float]] = {}

    def call(name: str):
        def run() -> None:
            reply = stub.ForwardPaged(requests[name], timeout=120)
            if reply.HasField("logits"):  # the scheduler reads the logits (numpy, no copy)
                torch.frombuffer(bytearray(reply.logits.data), dtype=torch.float32)
            sizes[name] = reply.ByteSize()
            compute.setdefault(name, []).append(reply.compute_seconds)

        return run

    try:
        stats = alternate(
            [Case(n, call(n)) for n in requests], b.budget(6.0), min_reps=5, max_reps=100, warmup=2
        )
    finally:
        channel.close()
        worker.client.unload(model_id)
    added = {}
    for name, s in stats.items():
        added[name] = paired_difference(s, Stats(tuple(compute[name][-len(s.samples) :])))
    last, none = "LOGITS_LAST float32", "LOGITS_NONE + sampling"
    b.report.add(
        Row(
            f"10. Reply bytes per decode step, batch {WIRE_BATCH}, LOGITS_NONE + sampling vs LOGITS_LAST "
            f"float32, {model.label}",
            f"{sizes[none]:,} B",
            f"{sizes[last]:,} B",
            sizes[none] / sizes[last],
            "report",
            key="sampling-wire-bytes",
        )
    )
    b.report.add(
        Row(
            f"10. gRPC time per decode step beyond the model call, batch {WIRE_BATCH}, LOGITS_NONE + "
            f"sampling vs LOGITS_LAST float32, {model.label}",
            f"+{added[none].fmt()} (RPC {stats[none].fmt()})",
            f"+{added[last].fmt()} (RPC {stats[last].fmt()})",
            ratio(added[none], added[last]),
            "report",
            note=f"saves {(added[last].median - added[none].median) * 1e3:.1f} ms per step",
            key="sampling-wire-time",
            spread=(added[none], added[last]),
        )
    )


def speculative(b: Bench, worker: WorkerProcess) -> None:
    """Item 10, the example scheduler: 64 greedy tokens of a repetitive prompt, plain and with n-gram
    drafts verified by the worker (the same tokens either way)."""
    from examples import continuous_batching as cb

    model = b.smol
    model_id = "smol-spec"
    worker.client.load(model_id, model.path, kv_cache=kv_config(BENCH_KV))
    prompt = [cb.DEFAULT_PROMPTS[0] * 2]
    results: dict[str, cb.RunResult] = {}

    def run(k: int):
        def go() -> None:
            results[str(k)] = cb.run(worker.client, model_id, prompt, SPEC_NEW, num_speculative_tokens=k)

        return go

    try:
        stats = alternate(
            [Case("plain", run(0)), Case("spec", run(SPEC_TOKENS))], b.budget(10.0), min_reps=3, max_reps=10
        )
    finally:
        worker.client.unload(model_id)
    spec, plain = results[str(SPEC_TOKENS)], results["0"]
    same = spec.outputs == plain.outputs
    s = spec.stats
    b.report.add(
        Row(
            f"10. Speculative decoding in the example scheduler, n-gram k={SPEC_TOKENS}, {SPEC_NEW} greedy "
            f"tokens of a repetitive prompt, {model.label}",
            f"{SPEC_NEW / stats['spec'].median:.1f} tok/s ({s.steps} steps, {s.acceptance_rate:.0%} of "
            f"{s.draft_tokens} drafts accepted)",
            f"{SPEC_NEW / stats['plain'].median:.1f} tok/s plain ({plain.stats.steps} steps)",
            ratio(stats["plain"], stats["spec"]),
            "report",
            note="the same tokens as plain greedy" if same else "**tokens differ from plain greedy**",
            key="speculative",
            spread=(stats["spec"], stats["plain"]),
        )
    )


def run(b: Bench, worker: WorkerProcess) -> None:
    started = time.perf_counter()
    sampling_cost(b)
    wire_bytes(b, worker)
    speculative(b, worker)
    print(f"  (item 10 took {time.perf_counter() - started:.0f} s)", flush=True)
