"""The clock that times calls on the workers: wall time, less the time the thread waited for a CPU.

The call queue decides which calls are quick and how many share a task from the seconds per call
that the workers measure (:mod:`futures_hpc.chunking`, :mod:`futures_hpc.call_queue`). Wall
time also counts the time a worker thread was ready to run but had no CPU to run on. With 64
local workers on 2 cores, a call of 1 ms of work took about 32 ms of wall time, so the queue
packed a dozen calls per task instead of some 400, and the client paid for 30 times as many
tasks. The same happens on a node shared with other jobs.

On Linux the kernel keeps, for each thread, the time it spent waiting in a run queue
(``/proc/thread-self/schedstat``, second field, in nanoseconds); :func:`call_clock` subtracts
it from the wall clock. Time spent waiting for I/O, a lock or a ``sleep`` is not run-queue time,
so a call that waits still measures as long as it waits. Where that file cannot be read,
:func:`call_clock` is the wall clock (``time.perf_counter``).

Both readings of an interval must come from the same thread.
"""

from __future__ import annotations

import time

#: The calling thread's scheduler statistics: CPU time, run-queue wait, time slices.
SCHEDSTAT_PATH = "/proc/thread-self/schedstat"


def _run_queue_seconds() -> float:
    with open(SCHEDSTAT_PATH, "rb") as stats:
        return int(stats.read().split()[1]) * 1e-9


def _wall_less_run_queue() -> float:
    return time.perf_counter() - _run_queue_seconds()


def _readable() -> bool:
    try:
        _run_queue_seconds()
    except (OSError, ValueError, IndexError):
        return False
    return True


def _no_run_queue() -> float:
    return 0.0


_READABLE = _readable()

#: Seconds on a clock that does not advance while the calling thread waits for a CPU.
call_clock = _wall_less_run_queue if _READABLE else time.perf_counter

#: Seconds the calling thread has waited for a CPU so far (always 0.0 where the kernel does not
#: say): one reading for a whole task of several chunks, which then time themselves on
#: ``time.perf_counter`` and share the wait out (:func:`futures_hpc.calls.run_chunks`); a
#: reading costs about 12 microseconds, two per chunk were a tenth of a task of trivial calls.
run_queue_seconds = _run_queue_seconds if _READABLE else _no_run_queue

__all__ = ["SCHEDSTAT_PATH", "call_clock", "run_queue_seconds"]
