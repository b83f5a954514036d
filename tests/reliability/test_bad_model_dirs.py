"""Broken model directories, loaded through a real `modelworker serve` process: each gets its status
code and a message naming what is wrong and where, nothing is registered, and the worker's resident
memory returns to where it was.

The directories are damaged copies of a ~21 MB model, so that a half-built model left behind (the
wrong-shape case builds the whole network before the mismatch is found) would stand far out of the
allowed slack."""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from registry import Model
from tests.worker.harness import make_settings, start_server
from worker.pb.modelworker.v1 import worker_pb2 as pb

from .common import SMALL_KV, Code, MiB, assert_status, rpc_error
from .procs import ServeProcess

# Resident memory after a refused Load may differ from before it by allocator noise only: far less
# than the ~21 MB of weights (plus 2 MB of KV cache) a leaked model would hold.
RSS_SLACK = 6 * MiB
UP_PROJ = "model.layers.1.mlp.up_proj.weight"


DOWN_PROJ = "model.layers.1.mlp.down_proj.weight"  # same shape as UP_PROJ transposed: same byte count
# directory → config.json keys changed
BAD_NUMBERS: dict[str, dict] = {
    "window-2e32": {"sliding_window": 2**32},
    "eps-nan": {"rms_norm_eps": float("nan")},
    "theta-inf": {"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
    "theta-nan": {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}},
    "linear-factor-0": {"rope_parameters": {"rope_type": "linear", "factor": 0}},
    "yarn-factor-negative": {"rope_parameters": {"rope_type": "yarn", "factor": -2.0}},
    "dynamic-factor-nan": {"rope_parameters": {"rope_type": "dynamic", "factor": float("nan")}},
    "vocab-2e31": {"vocab_size": 2**31},
    "vocab-wider": {"vocab_size": 8192 * 4},
}


def _link_weights(src: Path, dst: Path) -> None:
    dst.mkdir()
    os.link(src / "model.safetensors", dst / "model.safetensors")


def _config(src: Path, **changes: object) -> dict:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    return cfg


def _rewrite_header(src: Path, dst: Path, edit) -> None:  # noqa: ANN001 - edit(header) mutates it
    """Copy a safetensors file with its JSON header edited and the data bytes as they were."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def make_bad_dirs(src: Path, root: Path, outside: Path) -> None:
    """The ten kinds of broken directory, under root/bad/ (and a model outside root)."""
    bad = root / "bad"
    bad.mkdir()
    weights = src / "model.safetensors"

    _link_weights(src, bad / "missing-config")

    _link_weights(src, bad / "invalid-json")
    (bad / "invalid-json" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_')

    _link_weights(src, bad / "unknown-arch")
    (bad / "unknown-arch" / "config.json").write_text(
        json.dumps(_config(src, architectures=["FooForCausalLM"]))
    )

    _link_weights(src, bad / "wrong-type")
    (bad / "wrong-type" / "config.json").write_text(json.dumps(_config(src, hidden_size="256")))

    # Two shards through an index; the second shard is then deleted.
    tensors = load_file(weights)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    (bad / "missing-shard").mkdir()
    shutil.copy(src / "config.json", bad / "missing-shard")
    for shard, members in shards.items():
        save_file({k: tensors[k] for k in members}, bad / "missing-shard" / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, members in shards.items() for k in members}}
    (bad / "missing-shard" / "model.safetensors.index.json").write_text(json.dumps(index))
    (bad / "missing-shard" / "model-00002-of-00002.safetensors").unlink()

    (bad / "truncated").mkdir()
    shutil.copy(src / "config.json", bad / "truncated")
    size = weights.stat().st_size
    (bad / "truncated" / "model.safetensors").write_bytes(weights.read_bytes()[: size // 2])

    # A header whose tensor claims 4 TiB (offsets consistent with the shape, far past the file).
    (bad / "huge-tensor").mkdir()
    shutil.copy(src / "config.json", bad / "huge-tensor")

    def claim_huge(header: dict) -> None:
        entry = header[UP_PROJ]
        entry["shape"] = [2**20, 2**20]
        entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * 2**40]

    _rewrite_header(weights, bad / "huge-tensor" / "model.safetensors", claim_huge)

    # A header length prefix of 2^62 bytes.
    (bad / "huge-header").mkdir()
    shutil.copy(src / "config.json", bad / "huge-header")
    (bad / "huge-header" / "model.safetensors").write_bytes(
        struct.pack("<Q", 2**62) + weights.read_bytes()[8:]
    )

    (bad / "wrong-shape").mkdir()
    shutil.copy(src / "config.json", bad / "wrong-shape")
    tensors[UP_PROJ] = tensors[UP_PROJ].t().contiguous()
    save_file(tensors, bad / "wrong-shape" / "model.safetensors")

    (bad / "pickle-only").mkdir()
    shutil.copy(src / "config.json", bad / "pickle-only")
    torch.save({UP_PROJ: torch.zeros(2, 2)}, bad / "pickle-only" / "pytorch_model.bin")

    # Config numbers out of range or not finite (issue 21 items 2-3): each a copy with one key changed.
    for name, changes in BAD_NUMBERS.items():
        _link_weights(src, bad / name)
        (bad / name / "config.json").write_text(json.dumps(_config(src, **changes)))
    _link_weights(src, bad / "deep-json")
    (bad / "deep-json" / "config.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    _link_weights(src, bad / "long-integer")
    (bad / "long-integer" / "config.json").write_text(
        json.dumps(_config(src)).replace('"vocab_size": ', '"vocab_size": ' + "9" * 4300 + ', "x": ')
    )

    # Two tensors sharing bytes of the data section (the format forbids it).
    (bad / "overlap").mkdir()
    shutil.copy(src / "config.json", bad / "overlap")

    def overlap(header: dict) -> None:
        header[UP_PROJ]["data_offsets"] = list(header[DOWN_PROJ]["data_offsets"])

    _rewrite_header(weights, bad / "overlap" / "model.safetensors", overlap)

    # A FIFO as the weights file: opening or reading it would block a thread forever.
    (bad / "fifo").mkdir()
    shutil.copy(src / "config.json", bad / "fifo")
    os.mkfifo(bad / "fifo" / "model.safetensors")

    # Symlinks out of the root: the directory itself, and a weights file inside a real directory.
    shutil.copytree(src, outside)
    os.symlink(outside, bad / "escape-dir")
    (bad / "escape-file").mkdir()
    shutil.copy(src / "config.json", bad / "escape-file")
    os.symlink(outside / "model.safetensors", bad / "escape-file" / "model.safetensors")


# (directory under bad/, code, fragments of the message: what is wrong, and where)
CASES = [
    ("missing-config", Code.INVALID_ARGUMENT, ["missing-config/config.json", "not found"]),
    ("invalid-json", Code.INVALID_ARGUMENT, ["invalid-json/config.json", "not valid JSON"]),
    ("unknown-arch", Code.INVALID_ARGUMENT, ["'FooForCausalLM'", "not registered", "LlamaForCausalLM"]),
    ("wrong-type", Code.INVALID_ARGUMENT, ["config.json", "hidden_size", "'256'"]),
    ("missing-shard", Code.INVALID_ARGUMENT, ["missing-shard/model.safetensors.index.json",
                                              "model-00002-of-00002.safetensors", "missing"]),
    ("truncated", Code.INVALID_ARGUMENT, ["truncated/model.safetensors", "truncated"]),
    ("huge-tensor", Code.INVALID_ARGUMENT, ["huge-tensor/model.safetensors", f"'{UP_PROJ}'", "truncated"]),
    ("huge-header", Code.INVALID_ARGUMENT, ["huge-header/model.safetensors", f"header length {2**62}"]),
    ("wrong-shape", Code.INVALID_ARGUMENT, ["wrong-shape", f"{UP_PROJ} is [256, 512], expected [512, 256]"]),
    ("pickle-only", Code.INVALID_ARGUMENT, ["pickle-only", "pytorch_model.bin", "pickle", "refused"]),
    ("window-2e32", Code.INVALID_ARGUMENT, ["sliding_window", f"{2**32}", "out of range"]),
    ("eps-nan", Code.INVALID_ARGUMENT, ["rms_norm_eps", "nan", "finite"]),
    ("theta-inf", Code.INVALID_ARGUMENT, ["rope_theta", "inf", "finite"]),
    ("theta-nan", Code.INVALID_ARGUMENT, ["rope_theta", "nan", "finite"]),
    ("linear-factor-0", Code.INVALID_ARGUMENT, ["rope_parameters.factor", "0", "positive"]),
    ("yarn-factor-negative", Code.INVALID_ARGUMENT, ["rope_parameters.factor", "-2.0", "positive"]),
    ("dynamic-factor-nan", Code.INVALID_ARGUMENT, ["rope_parameters.factor", "nan", "finite"]),
    ("vocab-2e31", Code.INVALID_ARGUMENT, ["vocab_size", f"{2**31}", "out of range"]),
    ("vocab-wider", Code.INVALID_ARGUMENT, ["vocab_size 32768", "model.embed_tokens.weight", "[8192, 256]"]),
    ("deep-json", Code.INVALID_ARGUMENT, ["deep-json/config.json", "not valid JSON"]),
    ("long-integer", Code.INVALID_ARGUMENT, ["long-integer/config.json", "not valid JSON", "digits"]),
    ("overlap", Code.INVALID_ARGUMENT, ["overlap/model.safetensors", f"'{UP_PROJ}'", f"'{DOWN_PROJ}'", "overlap"]),
    ("fifo", Code.INVALID_ARGUMENT, ["fifo/model.safetensors", "not a regular file", "FIFO"]),
    ("escape-dir", Code.PERMISSION_DENIED, ["bad/escape-dir", "outside the model roots"]),
    ("escape-file", Code.PERMISSION_DENIED, ["model.safetensors", "escape-file", "links outside the model roots"]),
]  # fmt: skip


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory: pytest.TempPathFactory, model_root: Path) -> Path:
    root = tmp_path_factory.mktemp("bad-dirs-root")
    shutil.copytree(model_root / "medium", root / "medium")
    make_bad_dirs(root / "medium", root, tmp_path_factory.mktemp("outside") / "medium")
    return root


@pytest.fixture(scope="module")
def served(bad_root: Path, plugin_env: dict[str, str]) -> Iterator[ServeProcess]:
    """A `modelworker serve` process over the root with the broken directories, warmed up."""
    with ServeProcess(bad_root, plugin_env) as worker:
        # Warm-up: good loads (imports, the thread pool, and the allocator: glibc raises its mmap
        # threshold after the first large free, so later weights come from the heap), then one
        # refused load.
        for _ in range(3):
            worker.stub.Load(pb.LoadRequest(model_id="warm", model_dir="medium", kv_cache=SMALL_KV))
            worker.stub.Forward(pb.ForwardRequest(model_id="warm", token_ids=[1, 2, 3]))
            worker.stub.Unload(pb.UnloadRequest(model_id="warm"))
        rpc_error(lambda: worker.stub.Load(pb.LoadRequest(model_id="warm", model_dir="bad/wrong-shape")))
        yield worker


@pytest.mark.parametrize(("name", "code", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_model_dir(served: ServeProcess, name: str, code: Code, fragments: list[str]) -> None:
    worker = served
    request = pb.LoadRequest(model_id=f"bad-{name}", model_dir=f"bad/{name}", kv_cache=SMALL_KV)
    before = worker.settled_rss()
    started = time.perf_counter()
    err = rpc_error(lambda: worker.stub.Load(request, timeout=30))
    took = time.perf_counter() - started
    after = worker.settled_rss()
    assert_status(err, code, *fragments)
    assert worker.model_ids() == []
    print(
        f"bad model dir {name}: {err.code().name} in {took * 1000:.1f} ms; worker RSS {before / MiB:.1f} MiB before the Load, "
        f"{after / MiB:.1f} MiB after ({(after - before) / MiB:+.1f} MiB, slack {RSS_SLACK / MiB:.0f} MiB)"
    )
    assert after - before <= RSS_SLACK
    # Still serving: the good model loads, answers and goes.
    worker.stub.Load(pb.LoadRequest(model_id="good", model_dir="medium", kv_cache=SMALL_KV))
    assert len(worker.stub.Forward(pb.ForwardRequest(model_id="good", token_ids=[5, 6])).next_token_ids) == 1
    worker.stub.Unload(pb.UnloadRequest(model_id="good"))
    assert worker.model_ids() == []


def _live_objects() -> tuple[int, int]:
    """(nn.Module instances, Model instances) alive in this process (type() rather than isinstance:
    some torch objects warn when their __class__ is read). Counted by type first, in C: each call scans
    every object of the test process, and the test calls it twice per bad directory."""
    per_type = collections.Counter(map(type, gc.get_objects()))
    modules = sum(n for kind, n in per_type.items() if issubclass(kind, torch.nn.Module))
    return modules, sum(n for kind, n in per_type.items() if issubclass(kind, Model))


def test_refused_loads_free_what_they_built(aio_loop: asyncio.AbstractEventLoop, bad_root: Path) -> None:
    """RSS cannot see a half-built CPU model (to_empty maps pages the loader never touched before it
    found the bad tensor); object counts can. With the garbage collector off, a refused Load must
    leave no module or model behind: a model freed only by a later collection would, on a GPU, hold
    its device memory until then and make the next Load fail for lack of memory."""
    running = start_server(aio_loop, make_settings(bad_root))
    stub = running.stub()
    try:
        stub.Load(pb.LoadRequest(model_id="warm", model_dir="medium", kv_cache=SMALL_KV))
        stub.Unload(pb.UnloadRequest(model_id="warm"))
        gc.collect()
        for name, code, _ in CASES:
            gc.disable()
            try:
                before = _live_objects()
                request = pb.LoadRequest(model_id="b", model_dir=f"bad/{name}")
                err = rpc_error(lambda: stub.Load(request))  # noqa: B023 - called at once
                after = _live_objects()
            finally:
                gc.enable()
            assert err.code() == code
            print(f"bad model dir {name}: live (modules, models) {before} before the Load, {after} after")
            assert after == before, name
        assert running.registry.list_models() == []
    finally:
        running.stop(grace=0.5)
