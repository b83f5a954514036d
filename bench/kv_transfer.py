"""Item 9: KV block transfer between two worker processes over loopback (ExportKvBlocks from one,
ImportKvBlocks into the other, relayed chunk by chunk by the typed client in this process
(`copy_kv_blocks`), as a scheduler would move them).

- Throughput: 256 blocks of SmolLM2 (30 layers × 16 tokens × 3 KV heads × 64 × float32, K and V:
  0.74 MB a block, 189 MB in all), export alone, import alone and the whole move.
- One 512-token prompt: moving its 32 blocks from the prefill worker against recomputing its prefill
  on the decode worker (ForwardPaged of 512 tokens), which is what disaggregation saves the decoder.
"""

from __future__ import annotations

from worker.client import KvBlocks, KvCacheConfig

from .common import Case, Goal, Row, Stats, alternate, ratio
from .context import Bench
from .serving import WorkerProcess

TRANSFER_BLOCKS = 256
PROMPT = 512
BLOCK = 16
MODEL_ID = "smol-kv"


def kv_transfer(b: Bench, src: WorkerProcess, dst: WorkerProcess) -> None:
    kv = KvCacheConfig(block_size=BLOCK, num_blocks=2 * TRANSFER_BLOCKS, max_seq_len=64, max_batch_size=1)
    for w in (src, dst):
        w.client.load(MODEL_ID, b.smol.path, kv_cache=kv)
    a, c = src.client, dst.client
    ids = b.tokens(b.smol, PROMPT)[:].tolist()
    prompt_blocks = list(range(PROMPT // BLOCK))
    slots = [prompt_blocks[i // BLOCK] * BLOCK + i % BLOCK for i in range(PROMPT)]

    def prefill(client) -> object:  # noqa: ANN001 - either worker's client
        return client.forward_paged(
            MODEL_ID,
            ids,
            list(range(PROMPT)),
            [prompt_blocks],
            slots,
            [PROMPT],
            is_prefill=True,
            logits_mode="none",
        )

    prefill(a)  # real K/V in A's prompt blocks (the bytes moved do not depend on it)
    many = list(range(TRANSFER_BLOCKS))
    into = list(range(TRANSFER_BLOCKS, 2 * TRANSFER_BLOCKS))
    held: dict[str, KvBlocks] = {"many": a.export_kv_blocks(MODEL_ID, many)}
    nbytes = held["many"].nbytes

    def export_many() -> object:
        held["many"] = a.export_kv_blocks(MODEL_ID, many)
        return None

    def move_many() -> object:  # chunks handed on as they arrive (copy_kv_blocks), as a scheduler relays
        return a.copy_kv_blocks(MODEL_ID, many, c, MODEL_ID, into)

    stats = alternate(
        [
            Case("export", export_many),
            Case("import", lambda: c.import_kv_blocks(MODEL_ID, into, held["many"])),
            Case("move", move_many),
        ],
        b.budget(10.0),
        min_reps=3,
        max_reps=30,
    )

    def rate(s: Stats) -> str:
        return f"{nbytes / s.median / 1e9:.2f} GB/s"

    b.report.add(
        Row(
            f"9. KV transfer over loopback, {TRANSFER_BLOCKS} blocks of {BLOCK} tokens ({nbytes / 1e6:.0f} MB), {b.smol.label}",
            f"{rate(stats['move'])} worker to worker ({stats['move'].fmt('ms')})",
            f"export {rate(stats['export'])}, import {rate(stats['import'])}; memory read {b.bandwidth / 1e9:.1f} GB/s",
            key="kv-transfer-throughput",
            spread=(stats["move"],),
        )
    )

    dst_blocks = [TRANSFER_BLOCKS + i for i in prompt_blocks]
    move = Case("move", lambda: a.copy_kv_blocks(MODEL_ID, prompt_blocks, c, MODEL_ID, dst_blocks))
    recompute = Case("prefill", lambda: prefill(c))
    s = alternate([move, recompute], b.budget(10.0), min_reps=3, max_reps=30)
    b.report.add(
        Row(
            f"9. One {PROMPT}-token prompt's KV: move it vs recompute its prefill, {b.smol.label}",
            f"move {s['move'].fmt('ms')}",
            f"prefill {s['prefill'].fmt('ms')}",
            ratio(s["move"], s["prefill"]),
            Goal(1.0, strict=True),
            key="kv-transfer-vs-prefill",
            spread=(s["move"], s["prefill"]),
        )
    )
    for w in (src, dst):
        w.client.unload(MODEL_ID)
