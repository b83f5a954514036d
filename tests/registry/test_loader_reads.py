"""How the safetensors loader moves bytes: read(2) straight into same-dtype CPU parameters, a memory
map only for conversions, both in one file, and a file that shrinks under the reader."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch
from torch import nn

from registry import CorruptCheckpoint
from registry import safetensors_loader as loader
from registry.safetensors_loader import TensorEntry, load_weights

from .test_safetensors_loader import (
    LLAMA_STYLE_MAPPING,
    TinyLlama,
    assert_loaded,
    expected_parameters,
    hf_tensors,
    write_single,
)


def _no_map(*args: object, **kwargs: object) -> mmap.mmap:
    raise AssertionError("a memory map was opened for a same-dtype CPU load")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_same_dtype_is_read_without_a_memory_map(
    tmp_path: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16-bit types included: numpy has no bfloat16, so the bytes go through a uint8 view.
    tensors = hf_tensors(seed=11, dtype=dtype, bias=True)
    d = write_single(tensors, tmp_path / "m")
    module = TinyLlama(bias=True).to(dtype)
    monkeypatch.setattr(loader.mmap, "mmap", _no_map)
    total = load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors, bias=True))
    assert total == sum(t.nbytes for n, t in tensors.items() if "rotary_emb" not in n)


def test_mixed_dtypes_in_one_file_take_both_paths(tmp_path: Path) -> None:
    """Half the tensors already float32 (read directly), half bfloat16 (converted from the map)."""
    tensors = hf_tensors(seed=12)
    for i, name in enumerate(sorted(tensors)):
        if i % 2:
            tensors[name] = tensors[name].to(torch.bfloat16)
    d = write_single(tensors, tmp_path / "m")
    module = TinyLlama()
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters({n: t.float() for n, t in tensors.items()}))


def test_strided_parameters_are_filled_through_the_map(tmp_path: Path) -> None:
    """A parameter whose memory is not one contiguous run (here: stored transposed) still gets the
    checkpoint's values."""
    tensors = hf_tensors(seed=13)
    d = write_single(tensors, tmp_path / "m")
    module = TinyLlama()
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.weight.data = m.weight.data.t().contiguous().t()  # same shape, column-major
    assert not module.lm_head.weight.is_contiguous()
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors))


def test_a_file_that_shrinks_while_reading_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(bytes(range(256)) * 4)  # 1024 bytes
    entry = TensorEntry("model.norm.weight", path, torch.float32, (64,), offset=1000, nbytes=256)
    target = torch.empty(64)
    with path.open("rb", buffering=0) as f, pytest.raises(CorruptCheckpoint, match=r"model\.norm\.weight"):
        loader._read_direct(target, entry, f)


def test_direct_read_fills_exactly_the_target_bytes(tmp_path: Path) -> None:
    """A narrow of a fused parameter: only its rows change, the rows around it keep their values."""
    values = torch.randn(3, 8, generator=torch.Generator().manual_seed(14))
    path = tmp_path / "rows.bin"
    path.write_bytes(b"\x00" * 40 + values.numpy().tobytes())
    param = torch.full((7, 8), -5.0)
    entry = TensorEntry("x", path, torch.float32, (3, 8), offset=40, nbytes=values.nbytes)
    with path.open("rb", buffering=0) as f:
        loader._read_direct(param.narrow(0, 2, 3), entry, f)
    assert torch.equal(param[2:5], values)
    assert bool((param[:2] == -5.0).all()) and bool((param[5:] == -5.0).all())


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_direct_reads_fill_every_parameter(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large loads read on several threads (pread at each tensor's offset): every byte lands where a
    serial read puts it, fused q/k/v and gate/up rows included."""
    monkeypatch.setattr(loader, "_PARALLEL_READ_BYTES", 0)  # the tiny checkpoint takes the threaded path
    monkeypatch.setattr(loader, "READ_THREADS", threads)
    tensors = hf_tensors(seed=15, bias=True)
    d = write_single(tensors, tmp_path / "m")
    module = TinyLlama(bias=True)
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors, bias=True))


def test_a_short_read_on_a_reader_thread_reaches_the_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "_PARALLEL_READ_BYTES", 0)
    path = tmp_path / "short.safetensors"
    path.write_bytes(bytes(range(256)) * 4)
    reads = [
        (TensorEntry("a", path, torch.float32, (64,), offset=0, nbytes=256), torch.empty(64), ()),
        (
            TensorEntry("model.norm.weight", path, torch.float32, (64,), offset=1000, nbytes=256),
            torch.empty(64),
            (),
        ),
    ]
    with path.open("rb", buffering=0) as f, pytest.raises(CorruptCheckpoint, match=r"model\.norm\.weight"):
        loader._read_all_direct(reads, f)
