"""Import llama.cpp GGUF checkpoints as Hugging Face-layout safetensors directories.

`import_gguf` reads a GGUF file (Llama, Mistral or Qwen2; every tensor type the `gguf` package can
dequantize), and writes a directory the registry loads like any HF checkpoint:

    config.json                     built from the GGUF metadata
    model.safetensors               float32 or bfloat16, HF tensor names (or shards + index past a size)
    tokenizer.json, ...             when the GGUF has a tokenizer and transformers is installed
    gguf_import.json                the source file's size and sha256: marks a complete import
With `keep_quant` ("int4" / "int8"), projections stored as Q4_0 / Q4_1 / Q8_0 keep their blocks as
codes and scales under a `quant_method: gguf` quantization_config (keep_quant.py).

Two llama.cpp conventions are undone: tensor names (`blk.N.attn_q.weight` →
`model.layers.N.self_attn.q_proj.weight`) and, for the llama architecture only, the row permutation of
Q and K that turns HF's rotate-half RoPE layout into llama.cpp's interleaved pairs (Qwen2 runs NEOX
RoPE in llama.cpp and is stored unpermuted). Llama 3's rope scaling, which llama.cpp stores as a
`rope_freqs` tensor of per-frequency factors, is recovered as a `rope_scaling` entry.

The output is written into a temporary sibling directory, one tensor at a time (no full copy of the
model is ever held in memory), and renamed into place at the end: a failure leaves no partial OUT_DIR.
The `gguf` package is an optional dependency (`pip install 'modelworker[gguf]'`), imported lazily.
"""

from .cli import DEMO_GGUF_NAME, demo_gguf_path, main_import, main_prepare_demo
from .config import SUPPORTED_ARCHITECTURES, build_config
from .reader import GgufFile, GgufImportError, GgufTensor, read_gguf
from .tensors import TensorPlan, expected_tensors, hf_tensor_name, plan_tensors, unpermute_rotary
from .writer import (
    DEFAULT_MAX_SHARD_BYTES,
    MARKER_FILE,
    OUTPUT_DTYPES,
    ImportResult,
    file_fingerprint,
    import_gguf,
    import_gguf_detailed,
    is_complete_import,
    read_marker,
)

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "DEMO_GGUF_NAME",
    "MARKER_FILE",
    "OUTPUT_DTYPES",
    "SUPPORTED_ARCHITECTURES",
    "GgufFile",
    "GgufImportError",
    "GgufTensor",
    "ImportResult",
    "TensorPlan",
    "build_config",
    "demo_gguf_path",
    "expected_tensors",
    "file_fingerprint",
    "hf_tensor_name",
    "import_gguf",
    "import_gguf_detailed",
    "is_complete_import",
    "main_import",
    "main_prepare_demo",
    "plan_tensors",
    "read_gguf",
    "read_marker",
    "unpermute_rotary",
]
