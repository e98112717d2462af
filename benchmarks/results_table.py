"""Shared by the benchmark scripts: each owns one marked section of RESULTS.md."""

from __future__ import annotations

import os
from pathlib import Path

#: Where the sections go; ``STEMFORGE_BENCH_RESULTS`` redirects them (e.g. for a trial run).
RESULTS = Path(
    os.environ.get("STEMFORGE_BENCH_RESULTS", Path(__file__).resolve().parent / "RESULTS.md")
)


def update_results(name: str, body: str, path: Path = RESULTS, first: bool = False) -> None:
    """Write ``body`` as the section ``name`` of RESULTS.md (between its markers), keeping the others.

    A new section goes at the end, or right under the title with ``first``.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    elif first:
        title, _, rest = text.partition("\n")
        text = f"{title}\n\n{section}\n\n{rest.lstrip()}"
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def peak_rss() -> int:
    """Peak resident memory of this process, bytes.

    Read from /proc (VmHWM): ``getrusage``'s ru_maxrss survives ``exec`` on Linux and would
    report the parent's peak in a freshly started child.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")
