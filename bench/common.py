"""What every bench item shares: alternating timed runs with robust statistics, the memory-bandwidth
probe, process memory readings, the machine description and the one markdown table.

Timings on a shared machine are noisy, so candidates are never timed in separate blocks: each round
runs every candidate once (the order reversed every other round), and figures are medians with the
10th-90th percentile spread. A noisy neighbour then slows ours and the reference alike.
"""

from __future__ import annotations

import gc
import os
import platform
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

GiB = 1 << 30
MiB = 1 << 20


def quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default), q in [0, 1]."""
    if not values:
        raise ValueError("no samples")
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Stats:
    """Samples of one quantity (seconds, bytes, ...) in the order they were taken."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return quantile(self.samples, 0.5)

    @property
    def p10(self) -> float:
        return quantile(self.samples, 0.1)

    @property
    def p90(self) -> float:
        return quantile(self.samples, 0.9)

    @property
    def best(self) -> float:
        return min(self.samples)

    def scaled(self, factor: float) -> Stats:
        return Stats(tuple(x * factor for x in self.samples))

    def fmt(self, unit: str = "ms", digits: int = 3) -> str:
        """`12.3 ms (11.9–13.0)`: median and p10–p90 in `unit` (s, ms, µs)."""
        scale = {"s": 1.0, "ms": 1e3, "µs": 1e6}[unit]
        return (
            f"{_sig(self.median * scale, digits)} {unit} "
            f"({_sig(self.p10 * scale, digits)}–{_sig(self.p90 * scale, digits)})"
        )


def free_port() -> int:
    """A TCP port free on loopback now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_calls(fn: Callable[[], object], reps: int) -> Stats:
    """`reps` back-to-back calls of `fn`, each timed alone (seconds)."""
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return Stats(tuple(samples))


def _sig(x: float, digits: int) -> str:
    """x to `digits` significant figures (whole numbers stay whole: 871, not 8.71e+02)."""
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    return f"{x:#.{digits}g}"


@dataclass
class Case:
    """One candidate of a comparison. `prepare` runs untimed before every timed `run` (e.g. to rewind a
    cache), `cleanup` untimed after it with run's result (e.g. to unload a model)."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] | None = None
    cleanup: Callable[[object], object] | None = None
    collect: bool = False  # run the garbage collector after dropping the result (untimed)


def alternate(
    cases: Sequence[Case], budget_s: float, min_reps: int = 3, max_reps: int = 50, warmup: int = 1
) -> dict[str, Stats]:
    """Time every case once per round (ABC CBA ABC ...), after `warmup` untimed rounds; as many
    rounds as fit in `budget_s` judging by the last warm-up round, within [min_reps, max_reps].
    Round i of every case ran back to back, so per-round pairs share the machine's noise."""
    samples: dict[str, list[float]] = {c.name: [] for c in cases}

    def one_round(r: int, keep: bool) -> float:
        began = time.perf_counter()
        order = cases if r % 2 == 0 else list(reversed(cases))
        for case in order:
            if case.prepare is not None:
                case.prepare()
            start = time.perf_counter()
            result = case.run()
            elapsed = time.perf_counter() - start
            if case.cleanup is not None:
                case.cleanup(result)
            del result
            if case.collect:
                gc.collect()
            if keep:
                samples[case.name].append(elapsed)
        return time.perf_counter() - began

    round_s = 0.0
    for r in range(warmup):
        round_s = one_round(r, keep=False)
    reps = min_reps if round_s <= 0 else int(budget_s / round_s)
    reps = max(min_reps, min(max_reps, reps))
    for r in range(reps):
        one_round(warmup + r, keep=True)
    return {name: Stats(tuple(values)) for name, values in samples.items()}


def ratio(a: Stats, b: Stats) -> float:
    """a ÷ b as the median of the per-round ratios (both from the same `alternate` call): noise that
    hits a whole round cancels. Unpaired samples fall back to the ratio of the medians."""
    if len(a.samples) != len(b.samples):
        return a.median / b.median
    return quantile([x / y for x, y in zip(a.samples, b.samples, strict=True)], 0.5)


NOISY_SPREAD = 2.0  # p90 / p10 above this: the machine was busy with something else during the item


def is_noisy(s: Stats) -> bool:
    return s.p10 > 0 and s.p90 / s.p10 > NOISY_SPREAD


def paired_difference(a: Stats, b: Stats) -> Stats:
    """a - b round by round (both from the same `alternate` call)."""
    return Stats(tuple(x - y for x, y in zip(a.samples, b.samples, strict=True)))


# -- the hardware limit ------------------------------------------------------------------------------


def read_bandwidth(nbytes: int = GiB, reps: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the best of `reps` sums over an `nbytes` float32 tensor
    (far larger than any cache, so every byte comes from DRAM), with the bench's torch threads."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)  # ones, not empty: every page is really mapped
    x.sum()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    del x
    return nbytes / best


# -- process memory ----------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends of a Linux process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key.startswith(("Vm", "Rss")) and len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


# -- allocation ----------------------------------------------------------------------------------------

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Every allocation from 128 KiB up is then a fresh anonymous map: its pages are faulted in on first
# touch and returned on free, as in a process that loads its first model. glibc's default threshold
# moves up (to at most 32 MiB) as large blocks are freed, after which a second Load may land in pages
# the first one faulted in, and Load timings would depend on what ran before them.
FRESH_PAGES_THRESHOLD = 128 * 1024
FRESH_PAGES_ENV = {"MALLOC_MMAP_THRESHOLD_": str(FRESH_PAGES_THRESHOLD)}
STEADY_THRESHOLD = 32 * MiB  # where glibc's moving threshold ends up in a long-running process


def set_mmap_threshold(nbytes: int) -> bool:
    """Set glibc's mmap threshold in this process; False where that is not possible (not glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


# -- other work on the machine ----------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds used so far by the whole machine (steal included) and by this process tree
    (children are counted once they have been waited for)."""

    machine_busy: float
    own: float
    wall: float

    @staticmethod
    def take() -> CpuSnapshot:
        import psutil

        t = psutil.cpu_times()
        busy = sum(getattr(t, f) for f in t._fields if f not in ("idle", "iowait", "guest", "guest_nice"))
        me = psutil.Process().cpu_times()
        own = me.user + me.system + me.children_user + me.children_system
        return CpuSnapshot(busy, own, time.monotonic())


def foreign_cpu_share(start: CpuSnapshot, end: CpuSnapshot, cores: int) -> float:
    """The share of the cores' time that other processes (and other VMs: steal) used in between."""
    wall = end.wall - start.wall
    if wall <= 0:
        return 0.0
    foreign = (end.machine_busy - start.machine_busy) - (end.own - start.own)
    return max(foreign, 0.0) / (wall * cores)


# -- the machine ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# -- the table -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    """`ratio <= limit` (`<` when strict, `>=` / `>` with at_least); text overrides the printed form."""

    limit: float
    strict: bool = False
    at_least: bool = False  # ratio >= limit (a speed-up) instead of ratio <= limit
    text: str = ""

    def met(self, ratio: float) -> bool:
        if self.at_least:
            return ratio > self.limit if self.strict else ratio >= self.limit
        return ratio < self.limit if self.strict else ratio <= self.limit

    def __str__(self) -> str:
        if self.text:
            return self.text
        sign = (">" if self.strict else "≥") if self.at_least else ("<" if self.strict else "≤")
        return f"{sign} {self.limit:g}×"


@dataclass
class Row:
    item: str  # "2. Prefill 512, SmolLM2"
    ours: str
    reference: str
    ratio: float | None = None
    goal: Goal | str | None = None  # a str goal is checked by the item itself (met given)
    met: bool | None = None
    note: str = ""  # printed after the verdict: why a goal is missed, or what a figure means
    key: str = ""  # stable id for reasons written next to missed goals
    spread: tuple[Stats, ...] = ()  # the timings behind the row: flagged when one is noisy

    def __post_init__(self) -> None:
        if isinstance(self.goal, Goal) and self.ratio is not None and self.met is None:
            self.met = self.goal.met(self.ratio)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # lines above the table (machine, settings)
    footer: list[str] = field(default_factory=list)  # lines below it

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {render_row(row)}", flush=True)

    def markdown(self) -> str:
        lines = [*self.header, "", TABLE_HEAD, TABLE_RULE]
        lines += [render_row(r) for r in sorted(self.rows, key=_item_number)]
        if self.footer:
            lines += ["", *self.footer]
        return "\n".join(lines) + "\n"


def _item_number(row: Row) -> int:
    """Rows in the issue's item order (items run in another order: 7 needs a fresh worker)."""
    head = row.item.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


TABLE_HEAD = "| item | ours | reference | ratio | goal | met? |"
TABLE_RULE = "|---|---|---|---|---|---|"


def render_row(row: Row) -> str:
    ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
    goal = "—" if row.goal is None else str(row.goal)
    verdict = "—" if row.met is None else ("yes" if row.met else "**no**")
    note = row.note
    if any(is_noisy(s) for s in row.spread):
        note = f"noisy (p90 > {NOISY_SPREAD:g}× p10: other work on the machine)" + (
            f"; {note}" if note else ""
        )
    if note:
        verdict = f"{verdict}: {note}" if row.met is not None else note
    cells = [row.item, row.ours, row.reference, ratio, goal, verdict]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
