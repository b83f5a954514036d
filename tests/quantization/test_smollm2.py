"""Real weights: SmolLM2-135M quantized while loading (int8, int4) still answers and agrees with the
float32 model's next-token choices on a fixed text (numbers in README "Quantization")."""

from __future__ import annotations

import pytest
import torch

from architectures import llama
from registry import KvCacheOptions, LoadOptions
from registry.quantization import formats
from tests.real_model import PROMPT, smollm2_hf_dir, transformers_smollm2

pytestmark = pytest.mark.slow

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg, a goldsmith "
    "from Mainz, combined a screw press with movable metal type and an oil-based ink. Before his invention, "
    "books were copied by hand, usually by monks working in scriptoria, and a single Bible could take years "
    "to finish. Printing made books cheaper and faster to produce, so that within fifty years millions of "
    "copies circulated across Europe. Scholars could compare the same text in different cities, merchants "
    "printed price lists and maps, and reformers spread pamphlets that changed religion and politics. "
    "Literacy grew as schools used printed primers, and languages became more standard because printers "
    "chose one spelling for each word. Newspapers appeared in the seventeenth century, first as weekly "
    "sheets of foreign news, later as daily papers with advertisements. In the nineteenth century steam "
    "presses and cheap paper made from wood pulp brought reading to almost everyone, and public libraries "
    "opened in many towns. Today most text is read on screens, yet the idea that knowledge should be copied "
    "exactly and shared widely still comes from that workshop in Mainz. Historians still argue about how "
    "much Gutenberg borrowed from earlier printers in Korea and China, where movable type of clay, wood and "
    "bronze had been used for centuries, but they agree that his press was the first to spread so quickly."
)
# This SmolLM2 is read from a Q4_1 GGUF (4-bit, groups of 32): its weights are exactly representable
# by int4 in groups of 32, and re-grouping them into DESIGN's groups of 64 (576-wide inputs) and 128
# quantizes them a second time, which costs far more than int4 costs a model trained in bfloat16.
# So int4 is held to the 85% at groups of 32, and to its measured level at the default groups.
CASES = [("int8", None, 0.95), ("int4", 32, 0.85), ("int4", None, 0.65)]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    _, tokenizer = transformers_smollm2()
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    return ids


@pytest.fixture(scope="module")
def float32_choices(tokens: torch.Tensor) -> torch.Tensor:
    dense = llama.build(
        smollm2_hf_dir(), torch.device("cpu"), LoadOptions(kv_cache=KvCacheOptions(max_seq_len=64))
    )
    return dense.forward(tokens).argmax(-1)


def _load(quantization: str, monkeypatch: pytest.MonkeyPatch, group: int | None):
    if group is not None:
        monkeypatch.setattr(formats, "int4_group_size", lambda k: group)
    return llama.build(
        smollm2_hf_dir(),
        torch.device("cpu"),
        LoadOptions(quantization=quantization, kv_cache=KvCacheOptions(max_seq_len=64, num_blocks=8)),
    )


@pytest.mark.parametrize(("quantization", "group", "minimum"), CASES)
def test_quantized_smollm2_answers_and_agrees_with_float32(
    quantization: str,
    group: int | None,
    minimum: float,
    tokens: torch.Tensor,
    float32_choices: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = _load(quantization, monkeypatch, group)
    assert model.quantization == quantization and model.dtype == torch.bfloat16
    _, tokenizer = transformers_smollm2()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    logits = model.forward_with_cache(prompt, 0, prompt.shape[1], all_logits=False)
    answer, pos = [], prompt.shape[1]
    for _ in range(6):
        answer.append(int(logits[0].argmax()))
        logits = model.forward_with_cache(torch.tensor([answer[-1:]]), pos, 1, all_logits=False)
        pos += 1
    assert " Paris" in tokenizer.decode(answer)
    agreement = float((model.forward(tokens).argmax(-1) == float32_choices).float().mean())
    print(
        f"{quantization} groups {group or 'default'}: top-1 agreement with float32 over 256 tokens {agreement:.4f}, weight_bytes {model.weight_bytes}"
    )
    assert agreement >= minimum


PEAK_SCRIPT = """
import pathlib, resource, sys, torch
from architectures import llama
from registry import KvCacheOptions, LoadOptions, ModelConfig
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
with torch.device("meta"):  # torch's one-time set-up (about 190 MB) happens before the baseline
    llama.LlamaForCausalLM(ModelConfig.from_file(pathlib.Path(sys.argv[1]) / "config.json"))
before = rss()
model = llama.build(pathlib.Path(sys.argv[1]), torch.device("cpu"), LoadOptions(quantization=sys.argv[2],
                    kv_cache=KvCacheOptions(max_seq_len=16, num_blocks=1, block_size=16)))
# VmHWM: this image's high-water mark (ru_maxrss would include the forking parent's at fork time).
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(before, peak, model.weight_bytes)
"""


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantizing_while_loading_never_holds_the_dense_model(quantization: str) -> None:
    """Peak resident memory of a fresh process across the Load: the quantized weights, one layer's
    temporaries, and the embedding's bfloat16 conversion; never the dense model plus the quantized
    one (measured: int8 +272 MB, int4 +230 MB; the float32 model alone is 538 MB)."""
    import subprocess
    import sys
    from pathlib import Path

    model_dir = smollm2_hf_dir()
    dense_bytes = (model_dir / "model.safetensors").stat().st_size
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(model_dir), quantization],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )
    before, peak, weight_bytes = (int(x) for x in out.stdout.split())
    print(f"{quantization}: peak growth {(peak - before) / 1e6:.0f} MB, weights {weight_bytes / 1e6:.0f} MB")
    assert peak - before < weight_bytes + dense_bytes // 2
