"""ModelRegistry's contract: architectures, detection, load/unload semantics, exclusive access."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from registry import (
    InvalidArgument,
    InvalidConfig,
    KvCacheOptions,
    LoadOptions,
    LoadPlan,
    ModelAlreadyExists,
    ModelDirNotFound,
    ModelNotFound,
    ModelNotReady,
    ModelRegistry,
    ModelState,
    ModelWorkerError,
    OutOfResources,
    PermissionDenied,
    UnknownArchitecture,
)
from registry.cpu_gemm import resolve_cpu_gemm
from tests.registry.toy import TOY_ARCH, ToyModel, Tracker, toy_builder, write_toy_dir

WAIT = 10.0  # upper bound for events that must happen; never reached when the code is right
BLOCKED = 0.2  # how long a call must stay blocked to count as "waiting"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_toy_dir(root / "a")
    write_toy_dir(root / "b")
    return root


@pytest.fixture
def tracker() -> Tracker:
    return Tracker()


@pytest.fixture
def reg(root: Path, tracker: Tracker) -> ModelRegistry:
    registry = ModelRegistry(device="cpu", model_roots=[root])
    registry.register_architecture(TOY_ARCH, toy_builder(tracker))
    return registry


def snapshot(registry: ModelRegistry) -> list[tuple[str, str, ModelState, int]]:
    return [(e.model_id, e.architecture, e.state, id(e.model)) for e in registry.list_models()]


class Background(threading.Thread):
    """Runs a call in a thread and keeps its result or exception for the test to inspect."""

    def __init__(self, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result: object = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def finish(self) -> object:
        self.join(WAIT)
        assert not self.is_alive(), "call did not finish"
        if self.error is not None:
            raise self.error
        return self.result

    def still_blocked(self) -> bool:
        self.join(BLOCKED)
        return self.is_alive()


# -- architectures -----------------------------------------------------------------------------


def test_register_get_and_list_architectures(tracker: Tracker) -> None:
    registry = ModelRegistry()
    assert registry.list_architectures() == []
    assert registry.get_builder("LlamaForCausalLM") is None
    b1, b2 = toy_builder(tracker), toy_builder(tracker)
    registry.register_architecture("Zeta", b1)
    registry.register_architecture("Alpha", b2)
    assert registry.list_architectures() == ["Alpha", "Zeta"]
    assert registry.get_builder("Zeta") is b1 and registry.get_builder("Alpha") is b2
    registry.register_architecture("Zeta", b2)  # a later registration replaces the builder
    assert registry.get_builder("Zeta") is b2 and registry.list_architectures() == ["Alpha", "Zeta"]
    for name, builder in (("", b1), (None, b1), ("X", "not callable"), ("X", None)):
        with pytest.raises(InvalidArgument):
            registry.register_architecture(name, builder)  # type: ignore[arg-type]
    assert registry.list_architectures() == ["Alpha", "Zeta"]


# -- detect_architecture -----------------------------------------------------------------------


def test_detect_architecture(reg: ModelRegistry, root: Path) -> None:
    assert reg.detect_architecture("a") == TOY_ARCH
    assert reg.detect_architecture(root / "b") == TOY_ARCH
    # architectures[0] decides, whatever follows.
    write_toy_dir(root / "multi", architectures=[TOY_ARCH, "SomethingElse"])
    assert reg.detect_architecture("multi") == TOY_ARCH


def test_detect_missing_config(reg: ModelRegistry, root: Path) -> None:
    (root / "empty").mkdir()
    with pytest.raises(InvalidConfig, match="config.json not found"):
        reg.detect_architecture("empty")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"hidden_size": 8}', "architectures"),
        ('{"architectures": []}', "architectures"),
        ('{"architectures": null}', "architectures"),
        ('{"architectures": "LlamaForCausalLM"}', "architectures"),
        ('{"architectures": [3]}', "architectures"),
        ('{"architectures": [""]}', "architectures"),
    ],
)
def test_detect_bad_config(reg: ModelRegistry, root: Path, content: str | bytes, match: str) -> None:
    d = root / "bad"
    d.mkdir()
    path = d / "config.json"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(InvalidConfig, match=match) as info:
        reg.detect_architecture("bad")
    assert str(path) in str(info.value)  # says where


def test_detect_unregistered_lists_the_registered(reg: ModelRegistry, root: Path, tracker: Tracker) -> None:
    reg.register_architecture("AnotherForCausalLM", toy_builder(tracker))
    write_toy_dir(root / "gpt", architectures=["GPTNeoXForCausalLM"])
    with pytest.raises(UnknownArchitecture) as info:
        reg.detect_architecture("gpt")
    message = str(info.value)
    assert "GPTNeoXForCausalLM" in message
    assert f"AnotherForCausalLM, {TOY_ARCH}" in message
    assert isinstance(info.value, InvalidArgument)
    assert "none" in str(
        pytest.raises(UnknownArchitecture, ModelRegistry().detect_architecture, root / "a").value
    )


# -- loading -----------------------------------------------------------------------------------
RESOLVED_F32 = LoadOptions(
    dtype=torch.float32, cpu_gemm=resolve_cpu_gemm("auto", torch.device("cpu"), torch.float32)
)


def test_load_model_auto_and_access(reg: ModelRegistry, root: Path, tracker: Tracker) -> None:
    before = time.time()
    assert reg.load_model_auto("m1", "a") == TOY_ARCH
    model = reg.get_model("m1")
    assert isinstance(model, ToyModel) and tracker.calls == [
        # "auto" (dtype None, cpu_gemm auto) is resolved once, by the registry: float32 on CPU
        (root.resolve() / "a", torch.device("cpu"), RESOLVED_F32)
    ]
    assert model.config.architecture == TOY_ARCH and model.config.vocab_size == 11
    (entry,) = reg.list_models()
    assert (entry.model_id, entry.state, entry.model, entry.architecture) == (
        "m1",
        ModelState.READY,
        model,
        TOY_ARCH,
    )
    assert entry.spec.model_dir == root.resolve() / "a"
    assert entry.load_seconds > 0 and before <= entry.loaded_at <= time.time()
    with reg.get_model_mut("m1") as same:
        assert same is model
        logits = same.forward(torch.tensor([[1, 2, 3]]))
        assert torch.equal(logits, model.table[torch.tensor([[1, 2, 3]])])


def test_load_model_by_architecture_uses_the_named_builder(reg: ModelRegistry, root: Path) -> None:
    other = Tracker()
    reg.register_architecture("OtherForCausalLM", toy_builder(other))
    # is_quant_model is for quantized checkpoints (on a dense one the Load is refused).
    config = json.loads((root / "a" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (root / "a" / "config.json").write_text(json.dumps(config))
    entry = reg.load_model_by_architecture("m1", root / "a", "OtherForCausalLM", is_quant_model=True)
    assert entry.architecture == "OtherForCausalLM" and entry.state is ModelState.READY
    assert len(other.calls) == 1 and other.calls[0][2].is_quant_model is True
    with pytest.raises(UnknownArchitecture, match="NopeForCausalLM"):
        reg.load_model_by_architecture("m2", "a", "NopeForCausalLM")
    assert [e.model_id for e in reg.list_models()] == ["m1"]


def test_options_reach_the_builder(reg: ModelRegistry, tracker: Tracker) -> None:
    options = LoadOptions(dtype=torch.bfloat16, device="cpu", kv_cache=KvCacheOptions(block_size=32))
    outcome = reg.load("m1", "a", options=options)
    options = replace(options, cpu_gemm="torch")  # auto: bfloat16 keeps F.linear
    assert outcome.already_loaded is False and outcome.entry.spec.options == options
    assert tracker.calls[0][1:] == (torch.device("cpu"), options)


def test_load_outside_the_roots_reads_nothing(reg: ModelRegistry, tmp_path: Path, tracker: Tracker) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text("{this would be InvalidConfig if it were read")
    with pytest.raises(PermissionDenied):
        reg.load("m1", str(outside))
    with pytest.raises(PermissionDenied):
        reg.load("m1", "../outside")
    with pytest.raises(ModelDirNotFound):
        reg.load("m1", "nope")
    assert tracker.calls == [] and reg.list_models() == []


def test_idempotent_load(reg: ModelRegistry, root: Path, tracker: Tracker) -> None:
    first = reg.load("m1", "a")
    again = reg.load("m1", str(root / "a"))  # the same directory, spelled differently
    auto = reg.load_model_auto("m1", "a")
    assert first.already_loaded is False and again.already_loaded is True
    assert again.entry is first.entry and auto == TOY_ARCH
    assert len(tracker.calls) == 1
    assert reg.load("m1", "a", architecture=TOY_ARCH).already_loaded is True  # explicit = detected


@pytest.mark.parametrize(
    "other",
    [
        {"model_dir": "b"},
        {"options": LoadOptions(dtype=torch.float16)},
        {"options": LoadOptions(kv_cache=KvCacheOptions(num_blocks=4))},
        {"options": LoadOptions(is_quant_model=True)},
        {"architecture": "OtherForCausalLM"},
    ],
)
def test_another_spec_is_refused_and_the_old_model_keeps_serving(
    reg: ModelRegistry, tracker: Tracker, other: dict[str, object]
) -> None:
    reg.register_architecture("OtherForCausalLM", toy_builder(tracker))
    reg.load("m1", "a")
    before = snapshot(reg)
    model = reg.get_model("m1")
    kwargs = {"model_dir": "a", **other}
    with pytest.raises(ModelAlreadyExists, match="m1"):
        reg.load("m1", **kwargs)  # type: ignore[arg-type]
    assert snapshot(reg) == before and reg.get_model("m1") is model and len(tracker.calls) == 1
    assert not model.released  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "fail", [OutOfResources("no memory for m1"), RuntimeError("builder bug"), KeyboardInterrupt()]
)
def test_failed_load_leaves_the_registry_as_it_was(
    reg: ModelRegistry, tracker: Tracker, fail: BaseException
) -> None:
    reg.load("keep", "b")
    before = snapshot(reg)
    reg.register_architecture("FailingForCausalLM", toy_builder(tracker, fail=fail))
    with pytest.raises(type(fail)):
        reg.load("m1", "a", architecture="FailingForCausalLM")
    assert snapshot(reg) == before
    with pytest.raises(ModelNotFound):
        reg.get_model("m1")
    # The id is free: a good load of it now succeeds from scratch.
    outcome = reg.load("m1", "a")
    assert outcome.already_loaded is False and outcome.entry.state is ModelState.READY


def test_failed_admission_builds_nothing(reg: ModelRegistry, root: Path, tracker: Tracker) -> None:
    seen = []

    def admission(plan: LoadPlan) -> None:
        seen.append(plan)
        raise OutOfResources("would not fit")

    with pytest.raises(OutOfResources, match="would not fit"):
        reg.load("m1", "a", admission=admission)
    (plan,) = seen
    assert (plan.model_dir, plan.architecture, plan.options) == (
        root.resolve() / "a",
        TOY_ARCH,
        RESOLVED_F32,
    )
    assert plan.config.architecture == TOY_ARCH and plan.dtype == torch.float32
    assert plan.weight_bytes == 11 * 8 * 4  # the toy checkpoint's one float32 tensor
    assert plan.total_bytes == plan.weight_bytes + plan.cache.total_bytes > plan.weight_bytes
    assert tracker.calls == [] and reg.list_models() == []


def test_one_plan_per_load_reaches_a_builder_that_asks_for_it(
    reg: ModelRegistry, root: Path, tracker: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import registry.registry as registry_module

    reads: list[Path] = []
    real_read = registry_module.read_config_json
    monkeypatch.setattr(registry_module, "read_config_json", lambda p: reads.append(p) or real_read(p))
    admitted: list[LoadPlan] = []
    built: list[LoadPlan] = []

    def build(model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan) -> ToyModel:
        built.append(plan)
        return ToyModel(plan.config, device, options, tracker)

    reg.register_architecture("PlannedForCausalLM", build)
    write_toy_dir(root / "p", architectures=["PlannedForCausalLM"])
    reg.load("p1", "p", admission=admitted.append)
    assert len(built) == 1 and built[0] is admitted[0]  # one plan, shared by admission and builder
    assert reads == [root.resolve() / "p" / "config.json"]  # config.json read once per Load


@pytest.mark.parametrize(
    "model_id", ["", "x" * 129, "a/b", "..", ".", "a b", " a", "a\n", "é", "a:b", None, 5]
)
def test_model_ids_are_validated(reg: ModelRegistry, tracker: Tracker, model_id: object) -> None:
    with pytest.raises(InvalidArgument, match="model_id"):
        reg.load(model_id, "a")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="model_id"):
        reg.unload_model(model_id)  # type: ignore[arg-type]
    assert tracker.calls == [] and reg.list_models() == []


@pytest.mark.parametrize("model_id", ["x" * 128, "a", "Llama-3.1_8b.instruct", "..."])
def test_valid_model_ids(reg: ModelRegistry, model_id: str) -> None:
    assert reg.load(model_id, "a").entry.model_id == model_id
    assert [e.model_id for e in reg.list_models()] == [model_id]


# -- LOADING -----------------------------------------------------------------------------------


@pytest.fixture
def slow(reg: ModelRegistry, tracker: Tracker) -> tuple[threading.Event, threading.Event]:
    """Registers SlowForCausalLM, whose builder reports `started` and waits for `gate`."""
    started, gate = threading.Event(), threading.Event()
    reg.register_architecture("SlowForCausalLM", toy_builder(tracker, started=started, gate=gate))
    return started, gate


def test_loading_is_listed_but_not_usable(
    reg: ModelRegistry, slow: tuple[threading.Event, threading.Event]
) -> None:
    started, gate = slow
    load = Background(reg.load, "m1", "a", architecture="SlowForCausalLM")
    assert started.wait(WAIT)
    (entry,) = reg.list_models()
    assert (entry.model_id, entry.state, entry.model) == ("m1", ModelState.LOADING, None)
    with pytest.raises(ModelNotReady, match="loading"):
        reg.get_model("m1")
    with pytest.raises(ModelNotReady, match="loading"):
        with reg.get_model_mut("m1"):
            pass
    # Other models and the architecture map stay usable while a load runs.
    assert reg.load("m2", "b").entry.state is ModelState.READY
    assert "SlowForCausalLM" in reg.list_architectures()
    gate.set()
    assert load.finish().entry.state is ModelState.READY  # type: ignore[attr-defined]
    assert isinstance(reg.get_model("m1"), ToyModel)


def test_concurrent_load_of_the_same_spec_joins(
    reg: ModelRegistry, tracker: Tracker, slow: tuple[threading.Event, threading.Event]
) -> None:
    started, gate = slow
    first = Background(reg.load, "m1", "a", architecture="SlowForCausalLM")
    assert started.wait(WAIT)
    second = Background(reg.load, "m1", "a", architecture="SlowForCausalLM")
    assert second.still_blocked()
    # Another spec for the loading id is refused at once, without waiting.
    with pytest.raises(ModelAlreadyExists):
        reg.load("m1", "b", architecture="SlowForCausalLM")
    gate.set()
    a, b = first.finish(), second.finish()
    assert a.already_loaded is False and b.already_loaded is True  # type: ignore[attr-defined]
    assert a.entry is b.entry  # type: ignore[attr-defined]
    assert len(tracker.calls) == 1


def test_joiners_of_a_failed_load_get_its_error(reg: ModelRegistry, tracker: Tracker) -> None:
    started, gate = threading.Event(), threading.Event()
    reg.register_architecture(
        "BadForCausalLM", toy_builder(tracker, started, gate, fail=OutOfResources("oom"))
    )
    first = Background(reg.load, "m1", "a", architecture="BadForCausalLM")
    assert started.wait(WAIT)
    second = Background(reg.load, "m1", "a", architecture="BadForCausalLM")
    assert second.still_blocked()
    gate.set()
    for call in (first, second):
        with pytest.raises(OutOfResources, match="oom"):
            call.finish()
    assert reg.list_models() == [] and len(tracker.calls) == 1


# -- unloading ---------------------------------------------------------------------------------


def test_unload(reg: ModelRegistry, tracker: Tracker) -> None:
    reg.load("m1", "a")
    model = reg.get_model("m1")
    expected = model.weight_bytes + model.cache_spec.total_bytes
    assert reg.unload_model("m1") == expected > 0
    assert model.released and tracker.live == set()  # type: ignore[attr-defined]
    assert reg.list_models() == []
    for call in (reg.get_model, reg.unload_model, reg.get_entry):
        with pytest.raises(ModelNotFound, match="m1"):
            call("m1")
    with pytest.raises(ModelNotFound):
        with reg.get_model_mut("m1"):
            pass
    # The id is free for another spec.
    assert reg.load("m1", "b").already_loaded is False


def test_unload_during_load_waits_for_the_load(
    reg: ModelRegistry, tracker: Tracker, slow: tuple[threading.Event, threading.Event]
) -> None:
    started, gate = slow
    load = Background(reg.load, "m1", "a", architecture="SlowForCausalLM")
    assert started.wait(WAIT)
    unload = Background(reg.unload_model, "m1")
    assert unload.still_blocked()
    assert tracker.events == []
    gate.set()
    entry = load.finish().entry  # type: ignore[attr-defined]
    assert unload.finish() > 0  # type: ignore[operator]
    assert entry.state is ModelState.UNLOADING and entry.model is None
    assert reg.list_models() == [] and tracker.live == set()


def test_unload_during_a_failing_load_finds_nothing(reg: ModelRegistry, tracker: Tracker) -> None:
    started, gate = threading.Event(), threading.Event()
    reg.register_architecture("BadForCausalLM", toy_builder(tracker, started, gate, fail=RuntimeError("x")))
    load = Background(reg.load, "m1", "a", architecture="BadForCausalLM")
    assert started.wait(WAIT)
    unload = Background(reg.unload_model, "m1")
    assert unload.still_blocked()
    gate.set()
    with pytest.raises(RuntimeError):
        load.finish()
    with pytest.raises(ModelNotFound):
        unload.finish()


def test_unload_waits_for_the_holder_of_get_model_mut(reg: ModelRegistry, tracker: Tracker) -> None:
    reg.load("m1", "a")
    entered, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with reg.get_model_mut("m1") as model:
            entered.set()
            assert leave.wait(WAIT)
            model.forward(torch.tensor([[0]]))  # still usable at the end of the block
            tracker.note("holder done")

    holder = Background(hold)
    assert entered.wait(WAIT)
    unload = Background(reg.unload_model, "m1")
    assert unload.still_blocked()
    # While it waits the model is UNLOADING: listed, not usable, not loadable again.
    assert [(e.model_id, e.state) for e in reg.list_models()] == [("m1", ModelState.UNLOADING)]
    with pytest.raises(ModelNotReady, match="unloading"):
        reg.get_model("m1")
    with pytest.raises(ModelNotReady, match="unloading"):
        reg.load("m1", "a")
    with pytest.raises(ModelAlreadyExists):
        reg.load("m1", "b")
    with pytest.raises(ModelNotFound):  # a second unload does not double-free
        reg.unload_model("m1")
    leave.set()
    holder.finish()
    assert unload.finish() > 0  # type: ignore[operator]
    assert tracker.events[0] == "holder done" and tracker.events[1].startswith("release")
    assert reg.list_models() == []


def test_get_model_mut_is_exclusive(reg: ModelRegistry) -> None:
    reg.load("m1", "a")

    def second_user() -> None:
        with reg.get_model_mut("m1") as model:
            assert model.users == 0  # type: ignore[attr-defined]

    with reg.get_model_mut("m1") as model:
        model.users += 1  # type: ignore[attr-defined]
        assert model is reg.get_model("m1")  # read access is not blocked
        with pytest.raises(ModelNotReady, match="busy"):
            with reg.get_model_mut("m1", timeout=0.05):
                pass
        other = Background(second_user)
        assert other.still_blocked()
        model.users -= 1  # type: ignore[attr-defined]
    other.finish()


def test_failing_release_still_frees_the_id(reg: ModelRegistry) -> None:
    reg.load("m1", "a")
    model = reg.get_model("m1")

    def broken_release() -> int:
        raise RuntimeError("device error while freeing")

    model.release = broken_release  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="device error"):
        reg.unload_model("m1")
    assert reg.list_models() == []
    assert reg.load("m1", "a").already_loaded is False


def test_errors_are_typed() -> None:
    """Every error a caller can meet is a ModelWorkerError whose kind maps to one status code."""
    kinds = {
        InvalidArgument: "invalid_argument",
        InvalidConfig: "invalid_argument",
        UnknownArchitecture: "invalid_argument",
        ModelNotFound: "not_found",
        ModelDirNotFound: "not_found",
        ModelAlreadyExists: "already_exists",
        PermissionDenied: "permission_denied",
        OutOfResources: "resource_exhausted",
        ModelNotReady: "unavailable",
    }
    for cls, kind in kinds.items():
        assert issubclass(cls, ModelWorkerError) and cls.kind == kind
