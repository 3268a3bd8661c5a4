"""What ``futures-hpc store PATH`` shows and clears.

Clearing rewrites segments; it is meant for a store no run is writing to at the time (a
record appended to a segment while it is rewritten would be lost, and its call run again).
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass, field

from . import frames, segments
from .results import read_index


@dataclass
class StoreSummary:
    """What a store holds.

    Attributes
    ----------
    location : str
        The store.
    runs : list of dict
        What each run recorded about itself (``run``, ``started``, ``host``, ``user``, ``argv``).
    calls : dict
        Recorded calls per function name (a function without a name record: its id in hex).
    blocks : int
        Recorded blocks of ``map_blocks``.
    segments : int
        Segment files.
    size : int
        Bytes in the segment files.

    """

    location: str
    runs: list[dict] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)
    blocks: int = 0
    segments: int = 0
    size: int = 0


def summarize(location: str) -> StoreSummary:
    """Read what the store at ``location`` holds.

    Raises
    ------
    FileNotFoundError
        No store is there.

    """
    location = segments.normalized_location(location)
    if not segments.is_store(location):
        raise FileNotFoundError(f"{location} is not a futures_hpc store (no "
                                f"{segments.MARKER} file)")
    index = read_index(location, expand=False)
    summary = StoreSummary(location, runs=sorted(index.runs, key=lambda run: run["started"]),
                           blocks=len(index.blocks), segments=len(index.names))
    for function_id, count in index.calls_per_function.items():
        summary.calls[index.functions.get(function_id, function_id.hex())] += count
    summary.size = sum(len(data) for data in index.data)
    return summary


def report(summary: StoreSummary) -> list[str]:
    """The lines ``futures-hpc store`` prints."""
    lines = [f"store {summary.location}: {summary.segments} segment files, "
             f"{summary.size:,} bytes",
             f"{len(summary.runs)} runs, {sum(summary.calls.values()):,} calls recorded, "
             f"{summary.blocks:,} blocks recorded"]
    if summary.runs:
        lines.append("runs:")
        for run in summary.runs[-20:]:
            started = datetime.datetime.fromtimestamp(run["started"]).isoformat(" ", "seconds")
            command = " ".join(run.get("argv", []))[:80]
            lines.append(f"  {started}  {run['run']}  {run.get('user', '?')}@"
                         f"{run.get('host', '?')}  {command}")
        if len(summary.runs) > 20:
            lines.append(f"  ... and {len(summary.runs) - 20} earlier runs")
    if summary.calls:
        lines.append("calls recorded per function:")
        for name, count in summary.calls.most_common():
            lines.append(f"  {count:>12,}  {name}")
    return lines


def clear_function(location: str, name: str) -> int:
    """Remove every recorded call of the functions named ``name``; return how many.

    ``name`` is a function's qualified name as ``futures-hpc store`` shows it
    (``module.function``), or its last part (``function``), or a function id in hex.
    """
    location = segments.normalized_location(location)
    index = read_index(location, with_runs=False, expand=False)
    chosen = {function_id for function_id, known in index.functions.items()
              if name in (known, known.rsplit(".", 1)[-1])}
    chosen |= {function_id for function_id in index.calls_per_function
               if function_id.hex() == name}
    if not chosen:
        return 0
    removed = 0
    for number, (segment, data) in enumerate(zip(index.names, index.data, strict=True)):
        kept: list[bytes] = []
        dropped = 0
        whole = 0
        for offset, kind, first, second, length in frames.scan(data):
            end = offset + frames.HEADER_SIZE + length
            whole = end
            if kind in (frames.CALL, frames.CALLS, frames.FUNCTION) and first in chosen:
                dropped += (1 if kind == frames.CALL
                            else frames.key_count(second) if kind == frames.CALLS else 0)
                continue
            kept.append(bytes(data[offset:end]))
        if dropped or whole < len(data):
            index.data[number] = b""  # let go of the memory map before replacing the file
            del data
            segments.replace_segment(segment, b"".join(kept))
            removed += dropped
    return removed


def clear(location: str) -> None:
    """Delete the whole store at ``location``."""
    location = segments.normalized_location(location)
    if not segments.is_store(location):
        raise FileNotFoundError(f"{location} is not a futures_hpc store (no "
                                f"{segments.MARKER} file)")
    segments.remove_store(location)
