"""Many threads registering, loading, using, listing and unloading at once: no lost or duplicated
entries, exclusive use really exclusive, and only the expected error types."""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path

import torch

from registry import (
    LoadOptions,
    ModelAlreadyExists,
    ModelNotFound,
    ModelNotReady,
    ModelRegistry,
    ModelState,
    OutOfResources,
)
from tests.registry.toy import TOY_ARCH, ToyModel, Tracker, toy_builder, write_toy_dir

THREADS, OPS = 8, 50
IDS = ["m0", "m1", "m2", "m3"]
DIRS = ["a", "b", "bad"]  # two specs per id compete; "bad" always fails to build
EXPECTED = (ModelAlreadyExists, ModelNotFound, ModelNotReady, OutOfResources)


def test_registry_under_concurrent_operations(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for d in DIRS:
        write_toy_dir(root / d)
    tracker = Tracker()
    good = toy_builder(tracker)

    def builder(model_dir: Path, device: torch.device, options: LoadOptions) -> ToyModel:
        time.sleep(random.random() * 0.002)  # widen the LOADING window so that races happen
        if model_dir.name == "bad":
            with tracker.lock:
                tracker.calls.append((model_dir, device, options))
            raise OutOfResources("bad never fits")
        return good(model_dir, device, options)  # type: ignore[return-value]

    registry = ModelRegistry(model_roots=[root])
    registry.register_architecture(TOY_ARCH, builder)

    lock = threading.Lock()
    fresh_loads: collections.Counter[str] = collections.Counter()
    unloads: collections.Counter[str] = collections.Counter()
    registered: set[str] = {TOY_ARCH}
    seen_errors: collections.Counter[str] = collections.Counter()
    unexpected: list[BaseException] = []
    barrier = threading.Barrier(THREADS)

    def use(model_id: str) -> None:
        with registry.get_model_mut(model_id) as model:
            assert isinstance(model, ToyModel)
            model.users += 1
            try:
                assert model.users == 1, "two holders of get_model_mut at once"
                model.forward_with_cache(torch.tensor([[1, 2]]), 0, 2)
                time.sleep(0.001)  # hold it long enough for other threads to try (and unload)
                model.slice_kv_cache(0, 0, 2)  # fails if the model was released under us
            finally:
                model.users -= 1

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        for i in range(OPS):
            op = rng.choice(["load", "load", "load", "unload", "unload", "use", "get", "list", "register"])
            model_id = rng.choice(IDS)
            try:
                if op == "load":
                    outcome = registry.load(model_id, rng.choice(DIRS))
                    assert outcome.entry.model_id == model_id
                    if not outcome.already_loaded:
                        with lock:
                            fresh_loads[model_id] += 1
                elif op == "unload":
                    registry.unload_model(model_id)
                    with lock:
                        unloads[model_id] += 1
                elif op == "use":
                    use(model_id)
                elif op == "get":
                    registry.get_model(model_id).config  # noqa: B018 - read access
                elif op == "list":
                    ids = [e.model_id for e in registry.list_models()]
                    assert len(ids) == len(set(ids)) and set(ids) <= set(IDS)
                    assert TOY_ARCH in registry.list_architectures()
                else:
                    name = f"Plugin{seed}x{i}ForCausalLM"
                    registry.register_architecture(name, good)
                    with lock:
                        registered.add(name)
            except EXPECTED as exc:
                with lock:
                    seen_errors[type(exc).__name__] += 1
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                with lock:
                    unexpected.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert unexpected == [], unexpected[:3]

    final = registry.list_models()
    final_ids = {e.model_id for e in final}
    # Every id's history nets out: each successful unload matches one fresh load before it.
    for model_id in IDS:
        assert fresh_loads[model_id] - unloads[model_id] == (1 if model_id in final_ids else 0), model_id
    assert all(e.state is ModelState.READY and isinstance(e.model, ToyModel) for e in final)
    # Exactly the models still listed are alive: nothing leaked, nothing released twice or early.
    assert tracker.live == {id(e.model) for e in final}
    good_builds = sum(1 for d, _, _ in tracker.calls if d.name != "bad")
    assert good_builds == sum(fresh_loads.values())
    assert set(registry.list_architectures()) == registered
    # The run did exercise the contested paths, not just the happy one.
    assert sum(fresh_loads.values()) > 5 and sum(unloads.values()) > 5
    assert seen_errors["ModelNotFound"] > 0 and seen_errors["OutOfResources"] > 0
