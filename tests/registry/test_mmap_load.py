"""Load mode "mmap": CPU parameters whose bytes are the checkpoint's are views of the mapped file
(checked against /proc/self/maps, not against our own bookkeeping), everything else is copied, the
logits are bit-identical to a copying Load, and a checkpoint replaced by rename keeps serving."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import architectures
from architectures.lazy_zeros import zeros as lazy_zeros
from registry import InvalidArgument, KvCacheOptions, LoadOptions, ModelRegistry
from tests.tiny_models import make_tiny_model_dir

KV = KvCacheOptions(block_size=16, num_blocks=8, max_seq_len=64, max_batch_size=1)


def _mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[5].strip()))
    return out


def _mapped_from(t: torch.Tensor, path: Path) -> bool:
    """True when t's bytes lie in a mapping of `path` (also once the file was renamed over or deleted)."""
    ptr, name = t.data_ptr(), str(path.resolve())
    return any(
        start <= ptr and ptr + t.numel() * t.element_size() <= end and p.split(" (deleted)")[0] == name
        for start, end, p in _mappings()
    )


def _load(model_dir: Path, mode: str, model_id: str = "m", dtype: torch.dtype = torch.float32):
    registry = ModelRegistry(device="cpu")
    architectures.register_builtin(registry)
    registry.load(model_id, model_dir, None, LoadOptions(dtype=dtype, kv_cache=KV, load_mode=mode))
    return registry, registry.get_model(model_id)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("mmap") / "llama", "llama", seed=4)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(seed))


def test_mmap_maps_what_it_can_and_matches_a_copying_load(tiny: Path) -> None:
    _, copied = _load(tiny, "copy")
    _, mapped = _load(tiny, "mmap")
    ids = _ids(1)
    assert torch.equal(mapped.forward(ids), copied.forward(ids))
    assert (copied.load_mode, copied.mapped_weight_bytes) == ("copy", 0)
    assert mapped.load_mode == "mmap"
    assert mapped.weight_bytes == copied.weight_bytes
    checkpoint = tiny / "model.safetensors"
    names = {n: p for n, p in mapped.network.named_parameters()}
    file_backed = {n for n, p in names.items() if _mapped_from(p, checkpoint)}
    # q/k/v are not adjacent in the file (k, o, q, v by name): the fused qkv is copied; gate and up
    # are, so gate_up is one view; plain weights and norms are views.
    assert not any("qkv_proj" in n for n in file_backed)
    assert all(n in file_backed for n in names if "gate_up_proj" in n or "o_proj" in n or "norm" in n)
    assert "model.embed_tokens.weight" in file_backed
    assert mapped.mapped_weight_bytes == sum(
        p.numel() * p.element_size() for n, p in names.items() if n in file_backed
    )
    assert not any(_mapped_from(p, checkpoint) for p in copied.network.parameters())


def test_a_checkpoint_replaced_by_rename_keeps_the_model_serving(tiny: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "llama"
    shutil.copytree(tiny, model_dir)
    registry, model = _load(model_dir, "mmap")
    ids = _ids(2)
    before = model.forward(ids)
    # A new checkpoint (other values) written next to it and renamed over it: the atomic way.
    state = {n: t + 1.0 for n, t in load_file(model_dir / "model.safetensors").items()}
    save_file(state, str(model_dir / "model.safetensors.tmp"))
    os.replace(model_dir / "model.safetensors.tmp", model_dir / "model.safetensors")
    assert torch.equal(model.forward(ids), before)
    (model_dir / "model.safetensors").unlink()  # even a deleted checkpoint keeps its pages
    assert torch.equal(model.forward(ids), before)
    # A new Load of the directory (once restored) sees the new weights.
    save_file(state, str(model_dir / "model.safetensors"))
    _, reloaded = _load(model_dir, "mmap", "m2")
    assert not torch.equal(reloaded.forward(ids), before)
    assert registry.unload_model("m") > 0


def test_a_dtype_conversion_is_copied(tiny: Path) -> None:
    _, model = _load(tiny, "mmap", dtype=torch.bfloat16)  # the checkpoint is float32
    assert (model.load_mode, model.mapped_weight_bytes) == ("copy", 0)
    _, reference = _load(tiny, "copy", dtype=torch.bfloat16)
    assert torch.equal(model.forward(_ids(3)), reference.forward(_ids(3)))


def test_in_place_writes_to_a_mapped_weight_never_reach_the_file(tiny: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "llama"
    shutil.copytree(tiny, model_dir)
    before = (model_dir / "model.safetensors").read_bytes()
    _, model = _load(model_dir, "mmap")
    with torch.no_grad():
        model.network.model.norm.weight.add_(1.0)  # the private map copies the page for this process
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_an_unknown_load_mode_is_refused_before_anything_is_built(tiny: Path) -> None:
    registry = ModelRegistry(device="cpu")
    architectures.register_builtin(registry)
    with pytest.raises(InvalidArgument, match="load_mode 'lazy' is not one of mmap, copy"):
        registry.load("m", tiny, None, LoadOptions(kv_cache=KV, load_mode="lazy"))
    assert registry.list_models() == []


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_zeros_are_zeros_and_cost_only_the_pages_touched() -> None:
    shape = (4, 16, 1024, 1024)  # 256 MiB of float32
    before = _rss_bytes()
    t = lazy_zeros(shape, torch.float32, torch.device("cpu"))
    assert t.shape == shape and t.dtype == torch.float32
    assert int(t[0, 0].count_nonzero()) == 0 and int(t[3, 15, -1].count_nonzero()) == 0
    t[1, 2, 3, 4] = 5.0
    assert float(t[1, 2].sum()) == 5.0 and int(t[1, 2].count_nonzero()) == 1
    assert _rss_bytes() - before < t.numel() * t.element_size() // 4
    assert torch.equal(
        lazy_zeros((0, 3), torch.float16, torch.device("cpu")), torch.zeros(0, 3, dtype=torch.float16)
    )
