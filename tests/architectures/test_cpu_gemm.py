"""LoadOptions.cpu_gemm: which kernel a Load resolves to, and both kernels against transformers
(every path: full forward, cached decode, paged decode; biases; layers quantized at Load keep
their own kernels, the dense lm_head takes the model's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import architectures
from architectures import cpu_gemm
from architectures.cpu_gemm import GEMMS, Linear, kernel
from registry import InvalidArgument, KvCacheOptions, LoadOptions, ModelRegistry
from registry.cpu_gemm import MARGIN, calibrate_cpu_gemm, choose_cpu_gemm, resolve_cpu_gemm
from tests.tiny_models import make_hf_model, save_hf_model

CPU = torch.device("cpu")
KV = KvCacheOptions(block_size=4, num_blocks=16, max_seq_len=48, max_batch_size=2)


def test_auto_takes_the_kernel_measured_faster_here_and_torch_elsewhere() -> None:
    f32 = torch.float32
    measured = calibrate_cpu_gemm()
    assert resolve_cpu_gemm("auto", CPU, f32) == measured.choice
    assert calibrate_cpu_gemm() is measured  # once per process
    assert set(measured.gemv_seconds) == {"torch", "onednn", "mv"}
    assert set(measured.gemm_seconds) == {"torch", "onednn"}
    assert all(s > 0 for s in [*measured.gemv_seconds.values(), *measured.gemm_seconds.values()])
    assert measured.describe().startswith(f"{measured.choice} (over 25 MB of weights on ")
    assert resolve_cpu_gemm("onednn", CPU, f32) == "onednn"
    assert resolve_cpu_gemm("mv+onednn", CPU, f32) == "mv+onednn"
    assert resolve_cpu_gemm("torch", CPU, f32) == "torch"
    # other dtypes (torch already sends bfloat16 to oneDNN) and devices keep F.linear
    assert resolve_cpu_gemm("auto", CPU, torch.bfloat16) == "torch"
    assert resolve_cpu_gemm("onednn", CPU, torch.bfloat16) == "torch"
    assert resolve_cpu_gemm("onednn", torch.device("cuda"), f32) == "torch"
    with pytest.raises(InvalidArgument, match="cpu_gemm 'mkl' is not one of auto, torch, onednn"):
        resolve_cpu_gemm("mkl", CPU, f32)


def test_auto_leaves_torch_only_by_a_clear_margin() -> None:
    """A near tie keeps torch, so that two processes on one host do not pick differently; GEMV and
    GEMM are chosen apart."""
    tie = {"torch": 1.0, "onednn": MARGIN * 1.01, "mv": MARGIN * 1.02}
    assert choose_cpu_gemm(tie, {"torch": 1.0, "onednn": 1.5}) == "torch"
    assert choose_cpu_gemm({**tie, "onednn": MARGIN * 0.99}, {"torch": 1.0, "onednn": 0.5}) == "onednn"
    assert choose_cpu_gemm({**tie, "mv": 0.5}, {"torch": 1.0, "onednn": MARGIN * 1.01}) == "mv+torch"
    assert choose_cpu_gemm({**tie, "mv": 0.5, "onednn": 0.6}, {"torch": 1.0, "onednn": 0.5}) == "mv+onednn"
    assert choose_cpu_gemm({**tie, "onednn": 0.5}, {"torch": 1.0, "onednn": 1.0}) == "onednn+torch"
    assert choose_cpu_gemm(tie, {"torch": 1.0, "onednn": 0.5}) == "torch+onednn"


@pytest.fixture(autouse=True)
def every_layer_on_the_kernel(monkeypatch):
    """The tiny models' layers are all below KERNEL_MIN_WEIGHT: lower the bound so that they run the
    kernel under test (the size rule itself is tested below)."""
    monkeypatch.setattr(cpu_gemm, "KERNEL_MIN_WEIGHT", 0)


def test_layers_below_the_size_bound_keep_f_linear(pair, monkeypatch) -> None:
    _, reg, model_dir = pair
    bound = 128 * 64  # the lm_head's weight: it and the larger layers take oneDNN, o_proj does not
    monkeypatch.setattr(cpu_gemm, "KERNEL_MIN_WEIGHT", bound)
    model = _load(reg, "bound", model_dir, cpu_gemm="onednn")
    try:
        layers = [m for m in model.network.modules() if isinstance(m, Linear)]
        on_onednn = [m.weight.numel() >= bound for m in layers]
        assert any(on_onednn) and not all(on_onednn)
        assert [m.gemm for m in layers] == [GEMMS["onednn"] if big else GEMMS["torch"] for big in on_onednn]
    finally:
        reg.unload_model("bound")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """transformers' Llama with q/k/v/o and MLP biases, and a registry over its checkpoint."""
    ref = make_hf_model("llama", seed=21, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    model_dir = save_hf_model(ref, tmp_path_factory.mktemp("gemm"))
    reg = ModelRegistry(device="cpu", model_roots=[model_dir.parent])
    architectures.register_builtin(reg)
    return ref, reg, model_dir


def _load(reg: ModelRegistry, model_id: str, model_dir: Path, **options):
    return reg.load(model_id, model_dir, options=LoadOptions(kv_cache=KV, **options)).entry.model


@pytest.mark.parametrize("name", ["torch", "onednn", "mv+torch", "mv+onednn", "torch+onednn"])
def test_every_path_matches_transformers(pair, name: str, seed: int) -> None:
    """Every pair of kernels: one-row products (decode) take the first, the others the second."""
    ref, reg, model_dir = pair
    model = _load(reg, f"m-{name.replace('+', '-')}", model_dir, cpu_gemm=name)
    try:
        assert model.cpu_gemm == name
        linears = [m for m in model.network.modules() if isinstance(m, Linear)]
        assert len(linears) == 1 + 4 * model.config.num_hidden_layers  # lm_head; qkv, o, gate_up, down
        assert sum(m.bias is not None for m in linears) == 4 * model.config.num_hidden_layers
        assert all(m.gemm is kernel(name) for m in linears)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen)
        with torch.no_grad():
            want = ref(ids).logits
        assert float((model.forward(ids) - want).abs().max()) <= 1e-4
        model.reset_kv_cache()
        model.forward_with_cache(ids[:, :12], 0, 12)
        for pos in range(12, 20):
            step = model.forward_with_cache(ids[:, pos : pos + 1], pos, 1, all_logits=False)
            assert float((step - want[:, pos]).abs().max()) <= 1e-4
        seq = ids[0]
        table = [0, 1, 2, 3, 4]
        slots = torch.arange(20)
        prefill = model.forward_paged(seq[:19], torch.arange(19), [table], slots[:19], [19], True)
        decode = model.forward_paged(seq[19:], torch.tensor([19]), [table], slots[19:], [20], False)
        assert float((prefill[0] - want[0, 18]).abs().max()) <= 1e-4
        assert float((decode[0] - want[0, 19]).abs().max()) <= 1e-4
    finally:
        reg.unload_model(f"m-{name.replace('+', '-')}")


def test_quantized_layers_keep_their_kernel_and_both_kernels_agree(pair) -> None:
    _, reg, model_dir = pair
    models = {
        k: _load(reg, f"q-{k}", model_dir, cpu_gemm=k, quantization="int8", dtype=torch.float32)
        for k in ("torch", "onednn")
    }
    try:
        assert {k: m.cpu_gemm for k, m in models.items()} == {"torch": "torch", "onednn": "onednn"}
        for name, model in models.items():  # the lm_head stays dense: the only Linear left
            dense = [n for n, m in model.network.named_modules() if isinstance(m, Linear)]
            assert dense == ["lm_head"] and model.network.lm_head.gemm is kernel(name)
        ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(3))
        a, b = (m.forward(ids) for m in models.values())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    finally:
        for k in models:
            reg.unload_model(f"q-{k}")


def test_bfloat16_loads_report_the_torch_kernel(pair) -> None:
    _, reg, model_dir = pair
    model = _load(reg, "bf16", model_dir, cpu_gemm="onednn", dtype=torch.bfloat16)
    try:
        assert model.cpu_gemm == "torch"
        assert all(m.gemm is GEMMS["torch"] for m in model.network.modules() if isinstance(m, Linear))
    finally:
        reg.unload_model("bf16")


def test_concurrent_callers_share_one_measurement(monkeypatch) -> None:
    """Two Loads resolving auto at once: one measurement, and both get it."""
    import threading

    from registry import cpu_gemm as registry_gemm

    measured = calibrate_cpu_gemm()
    calls = []
    started = threading.Event()

    def slow_measure():
        calls.append(1)
        started.set()
        threading.Event().wait(0.05)  # long enough for the other caller to arrive while it runs
        return measured

    monkeypatch.setattr(registry_gemm, "_measured", None)
    monkeypatch.setattr(registry_gemm, "_measure", slow_measure)
    results = []
    threads = [threading.Thread(target=lambda: results.append(calibrate_cpu_gemm())) for _ in range(2)]
    threads[0].start()
    started.wait(10)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and results == [measured, measured]
