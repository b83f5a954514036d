"""`make gpu-check`'s tensor-parallel row: with several CUDA GPUs visible, one random-weight Llama
sharded over all of them with NCCL (`serve --tensor-parallel-size N`'s layers and slice loading),
against the same checkpoint on GPU 0 alone:

- logits: float32 (TF32 off), max |TP=N - TP=1| over a 64-token prompt, relative to max |logit|;
- decode step: bfloat16, paged, context 512, batch 1 and 16, TP=N against TP=1.

With fewer than two GPUs the row is skipped. `run(world, "cpu", ...)` runs the same code over gloo
on the CPU (the tests do, with a tiny shape).
"""

from __future__ import annotations

import math
import tempfile
import traceback
from pathlib import Path

import torch

from bench.gpu_check import LLAMA_1B
from bench.tensor_parallel import run_ranks

# gpu_check's 1B shape made smaller, so that its checkpoint is written in seconds (~190 M parameters).
SHAPE: dict = {
    **LLAMA_1B,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "tie_word_embeddings": False,
}
PROMPT = 64
CONTEXT = 512
BATCH_SIZES = (1, 16)
BLOCK_SIZE = 256
RELATIVE_TOLERANCE = 1e-4  # max |TP=N - TP=1| / max |logit| in float32 (the sums' order differs)


def write_checkpoint(shape: dict, out: Path) -> Path:
    """A random-weight Llama (std 0.02, norms near 1) as config.json + model.safetensors."""
    import json

    from safetensors.torch import save_file

    from architectures.llama import LlamaForCausalLM
    from registry import ModelConfig

    config = ModelConfig.from_hf(shape)
    with torch.device("meta"):
        names = {n: tuple(p.shape) for n, p in LlamaForCausalLM(config).named_parameters()}
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = shape["hidden_size"] // heads
    gen = torch.Generator().manual_seed(0)
    checkpoint: dict[str, torch.Tensor] = {}
    for name, dims in names.items():
        if len(dims) >= 2:
            t = torch.randn(dims, generator=gen) * 0.02
        else:
            t = 1 + 0.1 * torch.randn(dims, generator=gen)
        # Our fused parameters back to the checkpoint's names: qkv_proj → q/k/v, gate_up_proj → gate/up.
        if ".qkv_proj." in name:
            parts = t.split((heads * head_dim, kv * head_dim, kv * head_dim))
            for part, w in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                checkpoint[name.replace("qkv_proj", part)] = w.contiguous()
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2)
            checkpoint[name.replace("gate_up_proj", "gate_proj")] = gate.contiguous()
            checkpoint[name.replace("gate_up_proj", "up_proj")] = up.contiguous()
        else:
            checkpoint[name] = t
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16) for k, v in checkpoint.items()}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**shape, "torch_dtype": "bfloat16"}))
    return out


def _load(
    model_dir: Path, device: torch.device, dtype: torch.dtype, parallel, num_blocks: int, block_size: int
):  # noqa: ANN001, ANN202
    from architectures.backends import BACKENDS
    from architectures.base import build_causal_lm
    from architectures.llama import LlamaForCausalLM
    from registry import KvCacheOptions, LoadOptions, ModelConfig
    from registry.load_plan import make_load_plan

    options = LoadOptions(
        dtype=dtype,
        attention_backend="torch",
        kv_cache=KvCacheOptions(
            block_size=block_size, num_blocks=num_blocks, max_seq_len=PROMPT, max_batch_size=1
        ),
    )
    config = ModelConfig.from_file(model_dir / "config.json")
    plan = make_load_plan(
        model_dir, config.architecture, config, options, device, BACKENDS, parallel=parallel
    )
    return build_causal_lm(model_dir, device, options, LlamaForCausalLM, plan)


def _rank(rank: int, world: int, port: int, device_type: str, model_dir: str, settings: dict, out) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from bench.gpu_check import decode_ms
    from registry.parallel import SINGLE, ParallelContext

    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        parallel = ParallelContext(rank, world, None)
        path, context, iters = Path(model_dir), settings["context"], settings["iters"]
        block_size, batches = settings["block_size"], settings["batch_sizes"]
        blocks = math.ceil((context + 1) / block_size) * max(batches)
        vocab = settings["vocab_size"]
        ids = torch.randint(0, vocab, (1, settings["prompt"]), generator=torch.Generator().manual_seed(1))
        result: dict = {}
        with torch.inference_mode():
            if rank == 0:  # TP=1 on the first device; the others wait at the barrier
                whole = _load(path, device, torch.float32, SINGLE, blocks, block_size)
                reference = whole.forward(ids.to(device)).float().cpu()
                del whole
                whole = _load(path, device, torch.bfloat16, SINGLE, blocks, block_size)
                result["tp1_ms"] = {b: decode_ms(whole, b, context, iters) for b in batches}
                del whole
            dist.barrier()
            shard = _load(path, device, torch.float32, parallel, blocks, block_size)
            logits = shard.forward(ids.to(device)).float().cpu()
            del shard
            shard = _load(path, device, torch.bfloat16, parallel, blocks, block_size)
            result["tpn_ms"] = {b: decode_ms(shard, b, context, iters) for b in batches}
            del shard
        if rank == 0:
            result["max_error"] = float((logits - reference).abs().max())
            result["max_logit"] = float(reference.abs().max())
            out.put(result)
        dist.barrier()
    except BaseException:
        if rank == 0:
            out.put({"error": traceback.format_exc()})
        raise
    finally:
        dist.destroy_process_group()


def run(
    world: int,
    device_type: str,
    shape: dict = SHAPE,
    *,
    prompt: int = PROMPT,
    context: int = CONTEXT,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    block_size: int = BLOCK_SIZE,
    iters: int = 20,
    timeout: float = 600,
) -> dict:
    """Shard `shape` over `world` ranks (one per GPU, or gloo processes on the CPU): rank 0's
    {max_error, max_logit, tp1_ms, tpn_ms (by batch size)}."""
    with tempfile.TemporaryDirectory(prefix="modelworker-tp-check-") as tmp:
        model_dir = write_checkpoint(shape, Path(tmp) / "model")
        settings = dict(
            context=context,
            iters=iters,
            block_size=block_size,
            batch_sizes=batch_sizes,
            vocab_size=shape["vocab_size"],
            prompt=prompt,
        )
        result = run_ranks(_rank, world, (device_type, str(model_dir), settings), timeout)
    if "error" in result:
        raise RuntimeError(f"rank 0 failed:\n{result['error']}")
    return result


def report(device_count: int, iters: int = 20) -> tuple[str, bool]:
    """(the section printed and written by gpu-check, whether it failed)."""
    if device_count < 2:
        return (
            f"tensor parallelism: skipped ({device_count} CUDA GPU visible; the TP row needs 2 or more)",
            False,
        )
    try:
        result = run(device_count, "cuda", iters=iters)
    except Exception as exc:  # the other sections stand; the traceback goes to stderr
        traceback.print_exc()
        return f"tensor parallelism over {device_count} GPUs (NCCL): FAILED: {type(exc).__name__}", True
    return format_result(device_count, result)


def format_result(world: int, result: dict) -> tuple[str, bool]:
    relative = result["max_error"] / max(result["max_logit"], 1e-30)
    ok = relative <= RELATIVE_TOLERANCE
    shape = f"Llama {SHAPE['hidden_size']}h/{SHAPE['num_hidden_layers']}L/{SHAPE['num_attention_heads']}q"
    shape += f"/{SHAPE['num_key_value_heads']}kv, vocab {SHAPE['vocab_size']}"
    lines = [
        f"tensor parallelism over {world} GPUs (NCCL), {shape}:",
        f"- logits TP={world} vs TP=1, float32, {PROMPT} tokens: max |diff| {result['max_error']:.2e} "
        f"({relative:.1e} of max |logit|; {'ok' if ok else 'FAILED'}, limit {RELATIVE_TOLERANCE:g})",
    ]
    for b in sorted(result["tpn_ms"]):
        lines.append(
            f"- decode step bfloat16, context {CONTEXT}, batch {b}: TP={world} {result['tpn_ms'][b]:.2f} ms, "
            f"TP=1 {result['tp1_ms'][b]:.2f} ms"
        )
    return "\n".join(lines), not ok
