"""An RL trainer's side of weight sync: push new weights into a running worker after each training
step, free the worker's memory while "training", and check the worker's logits at every step.

The trainer here is a stand-in: its "training step" adds seeded noise to every weight of a
checkpoint. What it does with the worker is what verl / OpenRLHF do with their rollout engines:

1. Load the policy on the worker (or use the one loaded) and take its logits for a prompt.
2. Push perturbed weights over the gRPC stream (`update_weights_from_stream`): the logits change.
3. Push the original weights by torch.distributed broadcast (the trainer is rank 0 of a gloo group
   the worker joins with `init_weights_group`): the logits are the original ones again, bit for bit.
4. Broadcast the perturbed weights: the logits equal those of step 2, bit for bit (both paths agree).
5. Release the worker's weights and KV cache (forwards are refused), resume: the same logits.
6. Update from the checkpoint directory on disk: the original logits again.

Run it on the worker's host (the broadcast group listens on --master-address):

    python -m worker serve --model-root models &
    python examples/rl_weight_sync.py --address localhost:50051 --checkpoint models/smollm2-135m

`--checkpoint` is a safetensors directory the trainer reads; `--model-dir` is how the worker names it
(default: the checkpoint's absolute path, which must be inside one of the worker's model roots).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from worker.client import FailedPreconditionError, ModelWorkerClient
from worker.weights_group import WeightsGroup

PROMPT = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575]  # token ids; any below the vocab size work


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{path}: no safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return dict(sorted(tensors.items()))


def training_step(
    weights: dict[str, torch.Tensor], seed: int, scale: float = 0.01
) -> dict[str, torch.Tensor]:
    """The stand-in for an optimizer step: w + scale * |w|.mean() * noise, in each tensor's dtype."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        noise = torch.randn(w.shape, generator=g, dtype=torch.float32)
        out[name] = (w.float() + scale * w.float().abs().mean() * noise).to(w.dtype)
    return out


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def logits(client: ModelWorkerClient, model: str, vocab: int) -> np.ndarray:
    tokens = [t % vocab for t in PROMPT]
    return client.forward(model, tokens, logits_mode="all").logits


def broadcast(
    client: ModelWorkerClient, group: WeightsGroup, model: str, name: str, weights: dict[str, torch.Tensor]
) -> float:
    """Announce the tensors to the worker and broadcast them; returns the seconds taken."""
    specs = [(n, t.dtype, list(t.shape)) for n, t in weights.items()]
    started = time.perf_counter()
    reply: list = []
    # The RPC returns once the worker has received and applied everything; the broadcasts happen
    # meanwhile, from this thread.
    call = threading.Thread(
        target=lambda: reply.append(client.update_weights_from_distributed(model, name, specs))
    )
    call.start()
    for t in weights.values():
        group.broadcast(t.contiguous(), src=0)
    call.join()
    if not reply:
        raise SystemExit("UpdateWeightsFromDistributed failed (see the worker log)")
    return time.perf_counter() - started


def run(
    client: ModelWorkerClient,
    model: str,
    checkpoint: Path,
    model_dir: str,
    master_address: str = "127.0.0.1",
    verbose: bool = True,
) -> dict[str, float]:
    """Every step above; raises AssertionError when the worker's logits are not what they must be.
    Returns the timings (seconds) and throughputs (GB/s)."""

    def say(text: str) -> None:
        if verbose:
            print(text, flush=True)

    if model not in [m.id for m in client.list_models()]:
        client.load(model, model_dir)
    info = next(m for m in client.list_models() if m.id == model)
    base = read_checkpoint(checkpoint)
    nbytes = sum(t.numel() * t.element_size() for t in base.values())
    report: dict[str, float] = {}

    l0 = logits(client, model, info.vocab_size)
    say(f"model {model}: {len(base)} tensors, {nbytes / 1e6:.1f} MB; weights_version {info.weights_version}")

    step1 = training_step(base, seed=1)
    started = time.perf_counter()
    result = client.update_weights_from_stream(model, step1)
    report["stream_s"] = time.perf_counter() - started
    report["stream_GBps"] = nbytes / report["stream_s"] / 1e9
    l1 = logits(client, model, info.vocab_size)
    assert not np.array_equal(l0, l1), "the perturbed weights did not change the logits"
    say(
        f"stream:    version {result.weights_version}, {report['stream_s']:.3f} s ({report['stream_GBps']:.2f} GB/s)"
    )

    port = free_port(master_address)
    group_name = f"rl-sync-{port}"
    joined = threading.Thread(
        target=lambda: client.init_weights_group(master_address, port, 2, group_name, model_id=model)
    )
    joined.start()
    group = WeightsGroup.join(master_address, port, world_size=2, rank=0, group_name=group_name)
    joined.join()
    try:
        report["broadcast_s"] = broadcast(client, group, model, group_name, base)
        assert np.array_equal(logits(client, model, info.vocab_size), l0), "broadcast of the base weights"
        seconds = broadcast(client, group, model, group_name, step1)
        assert np.array_equal(logits(client, model, info.vocab_size), l1), "broadcast and stream disagree"
        report["broadcast_GBps"] = nbytes / seconds / 1e9
        say(f"broadcast: base and step-1 weights, {seconds:.3f} s each ({report['broadcast_GBps']:.2f} GB/s)")
    finally:
        client.destroy_weights_group(group_name)
        group.destroy()

    released = client.release_memory(model)
    report["release_s"] = released.release_seconds
    try:
        logits(client, model, info.vocab_size)
        raise AssertionError("a forward on a sleeping model must be refused")
    except FailedPreconditionError:
        pass
    resumed = client.resume_memory(model)
    report["resume_s"] = resumed.resume_seconds
    assert np.array_equal(logits(client, model, info.vocab_size), l1), "logits changed across release/resume"
    say(
        f"release:   {released.released_bytes / 1e6:.1f} MB in {released.release_seconds:.3f} s, "
        f"resume {resumed.resume_seconds:.3f} s, logits unchanged"
    )

    result = client.update_weights(model, model_dir)
    report["disk_s"] = result.update_seconds
    assert np.array_equal(logits(client, model, info.vocab_size), l0), "update from disk"
    say(f"disk:      version {result.weights_version}, {result.update_seconds:.3f} s; base logits again")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--model", default="policy", help="model id on the worker")
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="safetensors directory the trainer reads"
    )
    parser.add_argument("--model-dir", default="", help="the directory as the worker names it")
    parser.add_argument("--master-address", default="127.0.0.1")
    args = parser.parse_args(argv)
    model_dir = args.model_dir or str(args.checkpoint.resolve())
    torch.set_num_threads(max(1, torch.get_num_threads() // 2))
    with ModelWorkerClient(args.address, timeout=600) as client:
        run(client, args.model, args.checkpoint, model_dir, args.master_address)
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
