"""Helpers the benchmark scripts share: quiet logs, the reproducing command, fixed CPU work.

Imported by the scripts as ``_common`` (``python benchmarks/<name>.py`` puts this folder first on
``sys.path``; local worker processes inherit it). Not a benchmark itself.
"""

from __future__ import annotations

import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: Loggers whose INFO lines would otherwise interleave with a benchmark's output.
NOISY_LOGGERS = ("distributed", "dask", "dask_jobqueue", "futures_hpc", "dask_mpi")


def quiet_logs(level: int = logging.WARNING) -> None:
    """Set dask's, distributed's and futures_hpc's loggers to ``level`` (default WARNING).

    Also in the worker processes started later from here: distributed configures its loggers
    from dask's config when first imported, which a child process reads from the environment.
    """
    name = logging.getLevelName(level).lower()
    os.environ["DASK_LOGGING__DISTRIBUTED"] = name
    try:  # distributed sets its loggers' levels when first imported: import it before setting
        import distributed  # noqa: F401
    except ImportError:
        pass
    for logger in NOISY_LOGGERS:
        logging.getLogger(logger).setLevel(level)


def print_header(summary: str) -> None:
    """Print the one-line summary of what is compared and the command that reproduces it."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(script.parents[1]))  # benchmarks/<name>.py
    except ValueError:
        shown = str(script)
    print(f"compares: {summary}")
    print(f"command (from the repository root): {shlex.join(['python', shown, *sys.argv[1:]])}",
          flush=True)


def median(values: list[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def ratio(numerator: float, denominator: float) -> str:
    """``numerator / denominator`` as ``"1.23x"``."""
    return f"{numerator / denominator:.2f}x"


# -- a fixed amount of CPU work ----------------------------------------------------------------


def counted_work(iterations: int) -> int:
    """CPU-bound work of a fixed size: ``iterations`` steps of integer arithmetic.

    Never a wait on the clock: a call takes longer when the machine is busy, as real work does.
    """
    total = 0
    for step in range(iterations):
        total += step * step % 7
    return total


def timed(function: Callable[[], object]) -> float:
    """Wall seconds of one call of ``function``."""
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def cpu_seconds_of(iterations: int, probes: int = 20) -> float:
    """The least thread CPU time of ``probes`` calls of ``counted_work(iterations)`` here."""
    best = float("inf")
    for _ in range(probes):
        started = time.thread_time()
        counted_work(iterations)
        best = min(best, time.thread_time() - started)
    return best


def calibrate_iterations(milliseconds: float, probes: int = 40) -> int:
    """How many steps of :func:`counted_work` take ``milliseconds`` here (call it ONCE).

    The best of many short probes of thread CPU time, so that other processes on the machine
    weigh little; the count is then passed to every call on every side of a comparison.
    """
    probe = 50_000
    best = cpu_seconds_of(probe, probes)
    return max(1, round(probe * milliseconds / 1000 / best))
