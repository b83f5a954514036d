"""Model directories resolved against the model roots: escapes are refused before anything is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from registry import InvalidArgument, ModelDirNotFound, PermissionDenied
from registry.paths import resolve_model_dir


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two model roots, each with a model directory, and a directory outside both."""
    r1, r2, outside = tmp_path / "models", tmp_path / "more-models", tmp_path / "outside"
    for d in (r1 / "m1", r2 / "m2", outside / "secret"):
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
    return r1, r2, outside


def test_relative_is_taken_from_the_first_root(roots: tuple[Path, Path, Path]) -> None:
    r1, r2, _ = roots
    assert resolve_model_dir("m1", [r1, r2]) == r1.resolve() / "m1"
    assert resolve_model_dir(Path("m1"), [r1, r2]) == r1.resolve() / "m1"
    # Only the first root: a name that exists under the second one is not found.
    with pytest.raises(ModelDirNotFound, match="m2"):
        resolve_model_dir("m2", [r1, r2])


def test_absolute_inside_any_root(roots: tuple[Path, Path, Path]) -> None:
    r1, r2, _ = roots
    assert resolve_model_dir(str(r2 / "m2"), [r1, r2]) == r2.resolve() / "m2"
    assert resolve_model_dir(r1 / "m1", [r1, r2]) == r1.resolve() / "m1"
    # `..` that stays inside a root is just a path.
    assert resolve_model_dir(str(r1 / "m1" / ".." / "m1"), [r1]) == r1.resolve() / "m1"


@pytest.mark.parametrize("text", ["../outside/secret", "m1/../../outside/secret", "..", "/"])
def test_dot_dot_escapes_are_refused(roots: tuple[Path, Path, Path], text: str) -> None:
    r1, r2, _ = roots
    with pytest.raises(PermissionDenied, match="outside the model roots"):
        resolve_model_dir(text, [r1, r2])


def test_absolute_outside_every_root(roots: tuple[Path, Path, Path]) -> None:
    r1, r2, outside = roots
    for text in (str(outside / "secret"), str(r1 / ".." / "outside" / "secret"), "/etc"):
        with pytest.raises(PermissionDenied):
            resolve_model_dir(text, [r1, r2])


def test_a_sibling_with_the_root_as_prefix_is_outside(tmp_path: Path) -> None:
    root, sibling = tmp_path / "models", tmp_path / "models-evil" / "m"
    root.mkdir()
    sibling.mkdir(parents=True)
    with pytest.raises(PermissionDenied):
        resolve_model_dir(str(sibling), [root])
    with pytest.raises(PermissionDenied):
        resolve_model_dir("../models-evil/m", [root])


def test_escape_is_refused_even_when_the_target_does_not_exist(roots: tuple[Path, Path, Path]) -> None:
    r1, _, _ = roots
    with pytest.raises(PermissionDenied):
        resolve_model_dir("../nowhere", [r1])


def test_directory_symlink_escaping_a_root(roots: tuple[Path, Path, Path]) -> None:
    r1, r2, outside = roots
    (r1 / "evil").symlink_to(outside / "secret", target_is_directory=True)
    with pytest.raises(PermissionDenied):
        resolve_model_dir("evil", [r1, r2])
    with pytest.raises(PermissionDenied):
        resolve_model_dir(str(r1 / "evil"), [r1, r2])
    # A link from one root into another is inside the roots.
    (r1 / "alias").symlink_to(r2 / "m2", target_is_directory=True)
    assert resolve_model_dir("alias", [r1, r2]) == r2.resolve() / "m2"


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "weights"])
def test_file_symlink_escaping_a_root(roots: tuple[Path, Path, Path], name: str) -> None:
    r1, _, outside = roots
    d = r1 / "m3"
    d.mkdir()
    (outside / "target").mkdir()
    (d / name).symlink_to(outside / ("target" if name == "weights" else "secret/config.json"))
    with pytest.raises(PermissionDenied, match=name):
        resolve_model_dir("m3", [r1])


def test_dangling_symlink_out_of_the_roots(roots: tuple[Path, Path, Path]) -> None:
    r1, _, outside = roots
    d = r1 / "m4"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside / "does-not-exist")
    with pytest.raises(PermissionDenied):
        resolve_model_dir("m4", [r1])


def test_links_inside_the_roots_are_fine(roots: tuple[Path, Path, Path]) -> None:
    """The Hugging Face cache layout: snapshot files are links into a blobs directory."""
    r1, _, _ = roots
    blobs, snap = r1 / "hub" / "blobs", r1 / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "1234").write_text("{}")
    (snap / "config.json").symlink_to(os.path.relpath(blobs / "1234", snap))
    assert resolve_model_dir("hub/snapshots/abc", [r1]) == snap.resolve()


def test_missing_and_not_a_directory(roots: tuple[Path, Path, Path]) -> None:
    r1, _, _ = roots
    with pytest.raises(ModelDirNotFound, match="nope"):
        resolve_model_dir("nope", [r1])
    with pytest.raises(ModelDirNotFound):
        resolve_model_dir(str(r1 / "nope"), [r1])
    (r1 / "broken").symlink_to(r1 / "gone")
    with pytest.raises(ModelDirNotFound):
        resolve_model_dir("broken", [r1])
    with pytest.raises(InvalidArgument, match="not a directory"):
        resolve_model_dir("m1/config.json", [r1])


@pytest.mark.parametrize("text", ["", "m1\x00/x"])
def test_malformed_paths(roots: tuple[Path, Path, Path], text: str) -> None:
    with pytest.raises(InvalidArgument):
        resolve_model_dir(text, [roots[0]])


def test_roots_that_are_links(tmp_path: Path, roots: tuple[Path, Path, Path]) -> None:
    r1, _, _ = roots
    link = tmp_path / "root-link"
    link.symlink_to(r1, target_is_directory=True)
    assert resolve_model_dir(str(link / "m1"), [link]) == r1.resolve() / "m1"
    assert resolve_model_dir("m1", [link]) == r1.resolve() / "m1"


def test_without_roots_any_directory(roots: tuple[Path, Path, Path]) -> None:
    _, _, outside = roots
    assert resolve_model_dir(str(outside / "secret"), None) == (outside / "secret").resolve()
    assert resolve_model_dir(str(outside / "secret"), []) == (outside / "secret").resolve()
    with pytest.raises(ModelDirNotFound):
        resolve_model_dir(str(outside / "nope"), None)
