"""Architecture plugins found through the `modelworker.architectures` entry-point group, using real
distributions written to a directory on sys.path (what pip leaves behind: a .dist-info and a module)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import ENTRY_POINT_GROUP, InvalidArgument, ModelRegistry, load_entry_point_architectures


def install_fake_distribution(
    site: Path, dist: str, module: str, source: str, entry_points: dict[str, str]
) -> None:
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]"] + [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (site / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("mw_plugin_")]:
        del sys.modules[name]


def test_plugin_register_is_applied(site: Path) -> None:
    install_fake_distribution(
        site,
        "mw-plugin-good",
        "mw_plugin_good",
        """
        CALLS = []

        def build(model_dir, device, options):
            raise RuntimeError("never called here")

        def register(registry):
            CALLS.append(registry)
            registry.register_architecture("FancyForCausalLM", build)
            registry.register_architecture("FancierForCausalLM", build)
        """,
        {"fancy": "mw_plugin_good:register"},
    )
    registry = ModelRegistry()
    applied = load_entry_point_architectures(registry)
    assert "fancy" in applied
    import mw_plugin_good  # type: ignore[import-not-found]

    assert mw_plugin_good.CALLS == [registry]  # called once, with this registry
    assert {"FancyForCausalLM", "FancierForCausalLM"} <= set(registry.list_architectures())
    assert registry.get_builder("FancyForCausalLM") is mw_plugin_good.build


def test_without_plugins_nothing_is_registered(site: Path) -> None:
    registry = ModelRegistry()
    applied = load_entry_point_architectures(registry)
    assert not any(name.startswith("mw_") for name in applied)
    assert "FancyForCausalLM" not in registry.list_architectures()


def test_plugin_that_is_not_callable(site: Path) -> None:
    install_fake_distribution(
        site, "mw-plugin-bad", "mw_plugin_bad", "register = 42\n", {"bad": "mw_plugin_bad:register"}
    )
    with pytest.raises(InvalidArgument, match=r"plugin bad \(mw_plugin_bad:register\) is not callable"):
        load_entry_point_architectures(ModelRegistry())


def test_plugin_that_cannot_be_imported(site: Path) -> None:
    install_fake_distribution(
        site,
        "mw-plugin-broken",
        "mw_plugin_broken",
        "import mw_no_such_dependency\n",
        {"broken": "mw_plugin_broken:register"},
    )
    with pytest.raises(InvalidArgument, match=r"plugin broken .*cannot be imported.*mw_no_such_dependency"):
        load_entry_point_architectures(ModelRegistry())


def test_plugin_whose_register_fails(site: Path) -> None:
    install_fake_distribution(
        site,
        "mw-plugin-fails",
        "mw_plugin_fails",
        """
        def register(registry):
            registry.register_architecture("", print)  # an invalid name: the registry refuses it
        """,
        {"fails": "mw_plugin_fails:register"},
    )
    with pytest.raises(InvalidArgument, match=r"plugin fails .*failed to register.*non-empty"):
        load_entry_point_architectures(ModelRegistry())
