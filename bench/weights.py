"""Item 9: weight updates and memory release on a worker process, SmolLM2 (an RL trainer's loop).

Timed from the bench (the client) around each call: UpdateWeights from the checkpoint directory,
UpdateWeightsFromStream over loopback gRPC, UpdateWeightsFromDistributed from a gloo broadcast whose
rank 0 is this process, and ReleaseMemory / ResumeMemory of weights + KV cache (dropped and re-read,
and kept in host memory). Throughputs are checkpoint bytes per second.
"""

from __future__ import annotations

import threading

import torch
from safetensors.torch import load_file

from registry.safetensors_loader import checkpoint_files
from worker.weights_group import WeightsGroup

from .common import Row, Stats, free_port, time_calls
from .context import Bench
from .models import BenchModel
from .serving import WorkerProcess, load_remote

MODEL_ID = "smol-weights"


def _checkpoint(model: BenchModel) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model.path):
        tensors.update(load_file(str(path)))
    return dict(sorted(tensors.items()))


def updates(b: Bench, worker: WorkerProcess) -> None:
    model = b.smol
    client = worker.client
    info = load_remote(worker, MODEL_ID, model)
    reps = 2 if b.quick else 5
    tensors = _checkpoint(model)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    size = f"{nbytes / 1e6:.0f} MB checkpoint"
    bandwidth = f"memory read {b.bandwidth / 1e9:.1f} GB/s"

    def rate(stats: Stats) -> str:
        return f"{stats.fmt('s')}, {nbytes / stats.median / 1e9:.2f} GB/s"

    disk = time_calls(lambda: client.update_weights(MODEL_ID, model.path), reps)
    b.report.add(
        Row(
            f"11. UpdateWeights from disk, {model.label}",
            rate(disk),
            f"Load {info.load_seconds:.2f} s; {bandwidth}",
            note=f"{size}, read, checked, then copied under the model's lock",
            key="update-disk",
            spread=(disk,),
        )
    )
    stream = time_calls(lambda: client.update_weights_from_stream(MODEL_ID, tensors), reps)
    b.report.add(
        Row(
            f"11. UpdateWeightsFromStream (16 MiB chunks, loopback), {model.label}",
            rate(stream),
            bandwidth,
            note=size,
            key="update-stream",
            spread=(stream,),
        )
    )

    port = free_port()
    name = f"bench-{port}"
    joined = threading.Thread(
        target=lambda: client.init_weights_group("127.0.0.1", port, 2, name, model_id=MODEL_ID)
    )
    joined.start()
    group = WeightsGroup.join("127.0.0.1", port, world_size=2, rank=0, group_name=name)
    joined.join()
    specs = [(n, t.dtype, list(t.shape)) for n, t in tensors.items()]

    def broadcast() -> None:
        call = threading.Thread(target=lambda: client.update_weights_from_distributed(MODEL_ID, name, specs))
        call.start()
        for t in tensors.values():
            group.broadcast(t.contiguous(), src=0)
        call.join()

    try:
        gloo = time_calls(broadcast, reps)
    finally:
        client.destroy_weights_group(name)
        group.destroy()
    b.report.add(
        Row(
            f"11. UpdateWeightsFromDistributed (gloo broadcast), {model.label}",
            rate(gloo),
            bandwidth,
            note=size,
            key="update-gloo",
            spread=(gloo,),
        )
    )

    held = info.weight_bytes + info.kv_cache_bytes
    held_text = (
        f"{held / 1e6:.0f} MB = weights {info.weight_bytes / 1e6:.0f} + KV {info.kv_cache_bytes / 1e6:.0f}"
    )
    client.update_weights(MODEL_ID, model.path)  # weights from a directory again: droppable
    for offload, how in ((False, "dropped, re-read from disk"), (True, "kept in host memory")):
        release: list[float] = []
        resume: list[float] = []
        for _ in range(reps):
            release.append(client.release_memory(MODEL_ID, offload=offload).release_seconds)
            resume.append(client.resume_memory(MODEL_ID).resume_seconds)
        b.report.add(
            Row(
                f"11. ReleaseMemory / ResumeMemory, weights {how}, {model.label}",
                f"{Stats(tuple(release)).fmt('s')} / {Stats(tuple(resume)).fmt('s')}",
                held_text,
                note="times inside the worker",
                key=f"release-{'offload' if offload else 'drop'}",
            )
        )
    client.unload(MODEL_ID)
