"""Why a goal is missed on CPU, by row key: printed next to the figure when the run misses it."""

from __future__ import annotations

REASONS: dict[str, str] = {}
