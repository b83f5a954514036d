"""Third-party architectures: packages expose a `register(registry)` callable in the entry-point
group `modelworker.architectures`; the worker calls every one at start-up."""

from __future__ import annotations

import importlib.metadata
import logging
from typing import TYPE_CHECKING

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .registry import ModelRegistry

ENTRY_POINT_GROUP = "modelworker.architectures"
log = logging.getLogger(__name__)


def load_entry_point_architectures(registry: ModelRegistry) -> list[str]:
    """Call every registered plugin; returns the entry-point names that were applied.

    A broken plugin stops start-up with an error that names it: serving without an architecture
    the operator installed would only fail later, on the first Load that needs it.
    """
    applied = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"architecture plugin {ep.name} ({ep.value})"
        try:
            register = ep.load()
        except Exception as exc:
            raise InvalidArgument(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from exc
        if not callable(register):
            raise InvalidArgument(f"{where} is not callable (got {type(register).__name__})")
        try:
            register(registry)
        except Exception as exc:
            raise InvalidArgument(f"{where} failed to register: {type(exc).__name__}: {exc}") from exc
        applied.append(ep.name)
        log.info("architecture plugin %s loaded from %s", ep.name, ep.value)
    return applied
