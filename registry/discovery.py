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
    """Call every registered plugin; returns the entry-point names that were applied."""
    applied = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        register = ep.load()
        if not callable(register):
            raise InvalidArgument(f"entry point {ep.name} ({ep.value}) is not callable")
        register(registry)
        applied.append(ep.name)
        log.info("architecture plugin %s loaded from %s", ep.name, ep.value)
    return applied
