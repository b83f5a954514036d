"""An architecture added from outside the package: one file (plugin_softcap.py) and one entry point,
found by the worker's discovery, loaded by the registry and exact against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from architectures import register_builtin
from registry import (
    ENTRY_POINT_GROUP,
    InvalidConfig,
    KvCacheOptions,
    LoadOptions,
    ModelRegistry,
    load_entry_point_architectures,
)
from tests.architectures import plugin_softcap
from tests.tiny_models import make_hf_model, save_hf_model

CAP = 0.5  # small enough that tanh bends the tiny model's logits well away from linear


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelRegistry:
    """A registry as the worker builds it: built-ins, then every entry point on the path."""
    site = tmp_path / "site"
    dist = site / "modelworker_softcap-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: modelworker-softcap\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nsoftcap = {plugin_softcap.__name__}:register\n"
    )
    monkeypatch.syspath_prepend(str(site))
    reg = ModelRegistry(device="cpu", model_roots=[tmp_path])
    register_builtin(reg)
    assert "softcap" in load_entry_point_architectures(reg)
    return reg


def write_model(tmp_path: Path, cap: object) -> tuple[torch.nn.Module, Path]:
    ref = make_hf_model("llama", seed=3)
    model_dir = save_hf_model(ref, tmp_path / "softcap")
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = [plugin_softcap.ARCHITECTURE]
    config["final_logit_softcapping"] = cap
    (model_dir / "config.json").write_text(json.dumps(config))
    return ref, model_dir


def test_plugin_architecture_loads_and_matches_the_reference(registry: ModelRegistry, tmp_path: Path) -> None:
    ref, _ = write_model(tmp_path, CAP)
    small = LoadOptions(kv_cache=KvCacheOptions(num_blocks=4, max_seq_len=16))
    assert registry.load_model_auto("s", "softcap", options=small) == plugin_softcap.ARCHITECTURE
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        raw = ref(ids).logits
    want = CAP * torch.tanh(raw / CAP)  # the softcap formula over transformers' Llama logits
    assert (want - raw).abs().max() > 0.1  # the cap matters at this size
    with registry.get_model_mut("s") as model:
        assert (model.forward(ids) - want).abs().max() <= 1e-4
        # The paged path goes through the same network: prefill of sequence 0 into blocks 0-1.
        logits = model.forward_paged(ids[0], torch.arange(9), [[0, 1]], torch.arange(9), [9], True)
        assert (logits[0] - want[0, -1]).abs().max() <= 1e-4
    assert registry.unload_model("s") > 0


def test_plugin_config_field_is_validated_by_name(registry: ModelRegistry, tmp_path: Path) -> None:
    write_model(tmp_path, "high")
    with pytest.raises(
        InvalidConfig, match="config.json: final_logit_softcapping must be a positive number, got 'high'"
    ):
        registry.load("s", "softcap")
    assert registry.list_models() == []
