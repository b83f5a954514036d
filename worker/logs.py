"""Logging set-up: text or JSON lines on stderr, with structured fields on call lines."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

LOGGER_NAME = "modelworker"
# Structured fields travel on the record under this attribute (`log.info(msg, extra=fields(...))`).
FIELDS_ATTR = "mw_fields"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    return {FIELDS_ATTR: values}


# Characters that could forge or hide a line in a text log: C0/C1 controls, DEL, line separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    c = match.group()
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL.sub(_escape, text)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"
    text = escape_controls(str(value))
    return json.dumps(text) if (not text or any(c in text for c in ' "=')) else text


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # The message's own values (a model id, a path) are escaped too; a traceback keeps its lines.
        msg, args = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = msg, args
        extra = getattr(record, FIELDS_ATTR, None)
        if extra:
            tail = " ".join(f"{k}={_format_value(v)}" for k, v in extra.items() if v is not None)
            head, sep, rest = line.partition("\n")  # keep a traceback below the fields
            line = f"{head} {tail}{sep}{rest}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, FIELDS_ATTR, None) or {})
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Route the worker's and the libraries' logs to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_modelworker", False):
            root.removeHandler(old)
    handler._modelworker = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
