"""What every benchmark shares: the machine description, tables, PASS/FAIL lines and the
section of ``docs/benchmarks.md`` each script rewrites."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "bench" / ".cache"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEADER = """# Benchmarks

Written by the scripts in `bench/` (see the README); each script rewrites its own section.
Every ratio compares systems measured one after another in the same run on the same file, so
a busy machine slows both sides; the load average is recorded with each run.
"""


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """One line naming the CPU, the cores, the Python and the date."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        if found:
            cpu = found.group(1).strip()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu}, {cores()} cores, Python {platform.python_version()}, {date}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, which also reads well in a terminal."""
    cells = [[str(c) for c in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def verdict(name: str, value: float | None, limit: float, *, at_least: bool = False) -> str:
    """``PASS``/``FAIL`` line for one target; ``None`` means it could not be measured."""
    if value is None:
        return f"- {name}: NOT MEASURED"
    ok = value >= limit if at_least else value <= limit
    sign = "≥" if at_least else "≤"
    return f"- {name}: {value:.3f} (target {sign} {limit}) **{'PASS' if ok else 'FAIL'}**"


def write_section(name: str, body: str) -> None:
    """Replace the section ``name`` of docs/benchmarks.md with ``body`` (added if missing)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = DOC.read_text() if DOC.exists() else DOC_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    DOC.write_text(text)


def report(
    name: str,
    title: str,
    context: str,
    body: str,
    verdicts: Sequence[str],
    *,
    section_name: str | None = None,
) -> None:
    """Print the results and record them in docs/benchmarks.md under ``section_name``
    (default: the script's name)."""
    section = (
        f"## {title}\n\n`python -m bench.{name} {' '.join(sys.argv[1:])}`".rstrip()
        + f"\n\n{context}\n\n{body}\n\n"
        + "\n".join(verdicts)
    )
    print(section)
    write_section(section_name or name, section)


def wait_for(check: object, timeout: float, what: str, interval: float = 0.1) -> None:
    """Call ``check()`` until it returns true or ``timeout`` seconds pass."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f} s")
        time.sleep(interval)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
