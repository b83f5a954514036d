"""Model directories are resolved against the configured model roots before anything is read."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgument, ModelDirNotFound, PermissionDenied


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_model_dir(model_dir: str | os.PathLike[str], roots: Sequence[Path] | None) -> Path:
    """Absolute paths must lie inside a root, relative ones are taken from the first root.

    Symlinks are resolved first, so a link that points out of every root is refused, as is `..`.
    Without roots (library use) any existing directory is accepted.
    """
    text = os.fspath(model_dir)
    if not text:
        raise InvalidArgument("model_dir is empty")
    if "\x00" in text:
        raise InvalidArgument("model_dir contains a NUL character")
    path = Path(text)
    if not roots:
        resolved = Path(os.path.realpath(path))
    else:
        real_roots = [os.path.realpath(r) for r in roots]
        base = path if path.is_absolute() else Path(real_roots[0]) / path
        resolved_text = os.path.realpath(base)
        if not any(_within(resolved_text, r) for r in real_roots):
            raise PermissionDenied(f"model_dir {text!r} is outside the model roots ({', '.join(real_roots)})")
        resolved = Path(resolved_text)
    if not resolved.exists():
        raise ModelDirNotFound(f"model_dir {text!r} does not exist")
    if not resolved.is_dir():
        raise InvalidArgument(f"model_dir {text!r} is not a directory")
    if roots:
        check_files_within(resolved, [Path(os.path.realpath(r)) for r in roots])
    return resolved


def check_files_within(model_dir: Path, roots: Sequence[Path]) -> None:
    """Refuse a directory whose files are links that lead out of every root."""
    real_roots = [str(r) for r in roots]
    for entry in model_dir.iterdir():
        if entry.is_symlink():
            target = os.path.realpath(entry)
            if not any(_within(target, r) for r in real_roots):
                raise PermissionDenied(f"{entry.name} in {model_dir} links outside the model roots")
