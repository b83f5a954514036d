"""The trainer side of the broadcast tests: rank 0 of a weights group, run in its own process."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
from safetensors.torch import load_file

BAD_TENSOR = "model.layers.0.self_attn.q_proj.weight"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rounds(model_dir: Path) -> list[list[tuple[str, torch.Tensor]]]:
    """What the trainer broadcasts, in order: first a set with one mis-shaped tensor (refused by the
    worker), then the whole checkpoint."""
    tensors = sorted(load_file(str(model_dir / "model.safetensors")).items())
    bad = [(name, t[:-1] if name == BAD_TENSOR else t) for name, t in tensors]
    return [bad, tensors]


def specs(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.dtype, list[int]]]:
    return [(name, t.dtype, list(t.shape)) for name, t in tensors]


def trainer_main(port: int, group_name: str, model_dir: str) -> None:
    from worker.weights_group import WeightsGroup

    torch.set_num_threads(1)
    group = WeightsGroup.join("127.0.0.1", port, world_size=2, rank=0, group_name=group_name)
    for tensors in rounds(Path(model_dir)):
        for _, t in tensors:
            group.broadcast(t.contiguous(), src=0)
    group.destroy()
