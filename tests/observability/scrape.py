"""Scraping `/metrics` over real HTTP and reading it back with prometheus_client's own text parser,
plus the Prometheus naming rules that `promtool check metrics` enforces, for machines without it."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

EXPOSITION_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# grpc_code values as go-grpc-prometheus writes them (Go's codes.Code.String()), by numeric code.
GO_CODE_NAMES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
    "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented",
    "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)  # fmt: skip


@dataclass
class Scrape:
    text: str
    types: dict[str, str]  # family name -> counter | gauge | histogram | ...
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float | None:
        """The one sample `name` whose labels include `labels` (None if absent; error if ambiguous)."""
        found = [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]
        assert len(found) <= 1, f"{len(found)} samples of {name} match {labels}: {found}"
        return found[0].value if found else None

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def with_label(self, key: str, value: str) -> list[Sample]:
        return [s for s in self.samples if s.labels.get(key) == value]


def scrape(port: int, host: str = "127.0.0.1") -> Scrape:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"] == EXPOSITION_CONTENT_TYPE
        text = reply.read().decode("utf-8")
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        samples.extend(family.samples)
    return Scrape(text, types, samples)


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Non-base units that Prometheus naming rules forbid (seconds and bytes are the base units).
_NON_BASE_UNITS = re.compile(
    r"_(milli|micro|nano)?(second|minute|hour|day)s?$|_(ms|us|ns|msec|usec)$|_(kilo|mega|giga|kibi|mebi|gibi)?bytes?$"
)


def naming_problems(s: Scrape) -> list[str]:
    """The rules promtool's metrics linter checks that apply to us, checked independently."""
    problems = []
    for name, kind in s.types.items():
        if not _NAME.fullmatch(name):
            problems.append(f"{name}: not a valid metric name")
        unit_match = _NON_BASE_UNITS.search(name)
        if unit_match and unit_match.group(0) not in ("_seconds", "_bytes"):
            problems.append(f"{name}: use base units (seconds, bytes), not {unit_match.group(0)}")
        if kind != "counter" and name.endswith("_total"):
            problems.append(f"{name}: a {kind} must not end in _total")
        if kind == "histogram" and not name.endswith("_seconds"):
            problems.append(f"{name}: our histograms measure time and must end in _seconds")
        if "memory" in name or "_bytes" in name:
            if not name.endswith("_bytes"):
                problems.append(f"{name}: a size must end in _bytes")
        exposed = f"{name}_total" if kind == "counter" else name  # a counter's HELP names its samples
        if f"# HELP {exposed} " not in s.text:
            problems.append(f"{name}: no HELP text")
    for sample in s.samples:
        family = sample.name.removesuffix("_total").removesuffix("_created")
        for suffix in ("_bucket", "_count", "_sum"):
            if s.types.get(sample.name.removesuffix(suffix)) == "histogram":
                family = sample.name.removesuffix(suffix)
        kind = s.types.get(family)
        if kind == "counter" and not sample.name.endswith(("_total", "_created")):
            problems.append(f"{sample.name}: counter samples must end in _total")
        for key in sample.labels:
            if not _LABEL.fullmatch(key) or key.startswith("__"):
                problems.append(f"{sample.name}: bad label name {key!r}")
    return problems


def promtool_problems(text: str) -> list[str] | None:
    """`promtool check metrics` on the exposition text; None when promtool is not installed."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    out = (done.stdout + done.stderr).strip()
    if done.returncode == 0:
        return []
    return out.splitlines() or [f"promtool exited {done.returncode}"]
