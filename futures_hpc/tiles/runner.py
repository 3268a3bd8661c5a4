"""Handing tasks out to the executor, a bounded number in flight, and collecting outcomes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from futures_hpc.errors import FuturesHPCError
from futures_hpc.streams import SCATTER_WAIT_SECONDS
from futures_hpc.tiles.arrays import ArraySource, ImageSink, ImageSource
from futures_hpc.tiles.grid import Window, _Group
from futures_hpc.tiles.shared_memory import SharedMemoryStage, _remove
from futures_hpc.tiles.worker import (
    WINDOW_ATTRIBUTE,
    _BlockJob,
    _NotVisible,
    _Outcome,
    _run_group,
    _SharedJob,
    forget_job,
    job_held_by_workers,
)

logger = logging.getLogger("futures_hpc")

IN_FLIGHT_PER_THREAD = 2
IN_FLIGHT_REFRESH_SECONDS = 1.0

_forget_thread: ThreadPoolExecutor | None = None
_forget_thread_lock = threading.Lock()


def _forget_in_background(client: Any, token: str) -> None:
    """Have every worker drop a finished run's job, without the caller waiting for it.

    ``client.run(..., wait=False)`` still waits for the scheduler's broadcast to reach the
    workers and answer (5 ms to 10 ms on 2 local workers, a round trip through the scheduler):
    a thread of its own makes that call, so ``map_blocks`` returns as soon as its output is.
    """
    global _forget_thread
    with _forget_thread_lock:
        if _forget_thread is None:
            _forget_thread = ThreadPoolExecutor(1, thread_name_prefix="futures_hpc-tiles-forget")
        thread = _forget_thread
    thread.submit(_forget, client, token)


def _forget(client: Any, token: str) -> None:
    try:
        client.run(forget_job, token, wait=False)
    except Exception:  # noqa: BLE001 - a closing cluster forgets everything anyway
        logger.debug("could not drop job %s from the workers", token, exc_info=True)


class BlockError(FuturesHPCError, RuntimeError):
    """One or more blocks failed; the message names their windows.

    Attributes
    ----------
    failures : list of (Window, BaseException)
        Every failed block with its exception, in the order they failed.
    output : object
        With ``on_error="continue"``, what ``map_blocks`` would have returned (the other blocks
        are written) or the partial result of ``reduce_blocks``; otherwise None.
    """

    def __init__(self, message: str, failures: list[tuple[Window, BaseException]],
                 output: Any = None):
        super().__init__(message)
        self.failures = failures
        self.output = output

# --------------------------------------------------------------------------------------------
# handing tasks out to the executor
# --------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, progress: bool | Callable[[int, int], None], total: int):
        self.total = total
        self.done = 0
        self.callback = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="block")

    def advance(self, blocks: int) -> None:
        self.done += blocks
        if self.bar is not None:
            self.bar.update(blocks)
        if self.callback is not None:
            self.callback(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _Runner:
    """Submits groups with a bounded number in flight and collects what comes back."""

    executor: Any
    job: _BlockJob
    func_name: str
    on_error: str
    max_in_flight: int | None
    progress: _Progress
    shared_paths: list[str] = field(default_factory=list)
    stages: list[SharedMemoryStage] = field(default_factory=list)
    failures: list[tuple[Window, BaseException]] = field(default_factory=list)
    job_future: Any = None
    shared_job: _SharedJob | None = None
    #: True while the client holds too much output: submit nothing more until it is written.
    backlog: Callable[[], bool] | None = None
    #: Told of a group none of whose blocks produced output (a failed task).
    on_group_failed: Callable[[_Group], None] | None = None
    _limit: int = 2
    _limit_checked: float = float("-inf")

    def __enter__(self) -> _Runner:
        """Put the job on every running worker, or in a task where none is running.

        ``client.scatter(broadcast=True)`` gives each running worker a copy, so a group can
        run on any of them. With no worker running (an adaptive executor between bursts),
        dask's scatter would wait 30 s for one and then fail: the job becomes instead the
        result of a task every group depends on, which makes the executor ask for workers;
        the workers then fetch it from one another, and dask runs the task again if every
        worker holding the job has left.
        """
        self.shared_job = _SharedJob.of(self.job)
        client = self.executor.client
        try:
            self.job_future = client.scatter(self.shared_job, broadcast=True, hash=False,
                                             timeout=SCATTER_WAIT_SECONDS)
        except Exception as exc:  # noqa: BLE001 - no running worker, or one left meanwhile
            if client.status in ("closing", "closed"):
                raise
            logger.debug("the job goes in a task, not scattered: %r", exc)
            self.job_future = client.submit(
                job_held_by_workers, self.shared_job,
                key=f"futures_hpc-tiles-job-{self.shared_job.token}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.close()
        for stage in self.stages:
            stage.close()
        if self.job_future is not None:
            self.job_future.release()
            _forget_in_background(self.executor.client, self.shared_job.token)
        for path in self.shared_paths:
            _remove(path)

    def in_flight_limit(self) -> int:
        if self.max_in_flight is not None:
            return int(self.max_in_flight)
        now = time.monotonic()
        if now - self._limit_checked > IN_FLIGHT_REFRESH_SECONDS:
            threads = sum(self.executor.client.nthreads().values())
            self._limit = max(2, IN_FLIGHT_PER_THREAD * threads)
            self._limit_checked = now
        return self._limit

    def submit(self, group: _Group, sink: ImageSink | None, send_all: bool = False) -> Future:
        last_row = min(group.window.image_shape[0], group.window.padded_rows.stop)
        for stage in self.stages:
            stage.ensure_rows(last_row)
        data = None
        if send_all or not all(source.worker_readable for source in self.job.sources):
            window = group.window
            data = [source.read(window.read_rows, window.read_cols)
                    if send_all or not source.worker_readable else None
                    for source in self.job.sources]
        return self.executor.submit(_run_group, self.job_future, group, sink, data)

    def run(self, groups: Iterable[_Group], sink: ImageSink | None,
            on_outcome: Callable[[_Group, _Outcome], None], counted: bool = True) -> None:
        """Run every group, calling ``on_outcome`` on the client for each.

        ``counted`` says whether finished blocks advance the progress report.
        """
        worker_sink = sink if sink is not None and sink.worker_writable else None
        pending: dict[Future, tuple[_Group, bool]] = {}
        remaining = iter(groups)
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < self.in_flight_limit() and not (
                        pending and self.backlog is not None and self.backlog()):
                    group = next(remaining, None)
                    if group is None:
                        exhausted = True
                    else:
                        pending[self.submit(group, worker_sink)] = (group, False)
                if not pending:
                    return
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in finished:
                    group, resent = pending.pop(future)
                    if self._collect(future, group, resent, on_outcome, pending) and counted:
                        self.progress.advance(len(group.windows))
        finally:
            for future in pending:
                future.cancel()

    def _collect(self, future: Future, group: _Group, resent: bool,
                 on_outcome: Callable[[_Group, _Outcome], None],
                 pending: dict[Future, tuple[_Group, bool]]) -> bool:
        """Handle a finished task; tell whether its blocks are done (not resent)."""
        try:
            outcome = future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is reported with its window
            window = getattr(exc, WINDOW_ATTRIBUTE, None)
            self._group_failed(group)
            self._fail([window] if window is not None else list(group.windows), exc)
            return True
        if isinstance(outcome, _NotVisible):
            if resent:
                self._group_failed(group)
                self._fail(list(group.windows), RuntimeError(outcome.reason))
                return True
            logger.info("%s: %s; sending its data through the client", group, outcome.reason)
            pending[self.submit(group, None, send_all=True)] = (group, True)
            return False
        for window, exc in outcome.failures:
            self._fail([window], exc)
        try:
            on_outcome(group, outcome)
        except Exception as exc:  # noqa: BLE001 - e.g. the client's write of the group
            self._fail(list(group.windows), exc)
        return True

    def _group_failed(self, group: _Group) -> None:
        if self.on_group_failed is not None and self.on_error != "raise":
            self.on_group_failed(group)

    def _fail(self, windows: list[Window], exc: BaseException) -> None:
        self.failures.extend((window, exc) for window in windows)
        if self.on_error == "raise":
            raise BlockError(_failure_message(self.func_name, self.failures),
                             list(self.failures)) from exc
        if self.on_error == "continue":
            logger.warning("%s failed on %s: %s: %s", self.func_name, windows[0],
                           type(exc).__name__, exc)

    def raise_failures(self, output: Any) -> None:
        if self.failures:
            raise BlockError(_failure_message(self.func_name, self.failures),
                             list(self.failures), output) from self.failures[0][1]


def _failure_message(func_name: str, failures: list[tuple[Window, BaseException]]) -> str:
    window, exc = failures[0]
    message = f"{func_name} failed on {window}: {type(exc).__name__}: {exc}"
    if len(failures) > 1:
        others = "; ".join(str(window) for window, _ in failures[1:6])
        more = f" and {len(failures) - 6} more" if len(failures) > 6 else ""
        message += f" (also failed: {others}{more})"
    return message


def _stage_inputs(sources: list[ImageSource], runner: _Runner) -> list[ImageSource]:
    """Replace in-memory inputs by copies in shared memory, made as blocks need them."""
    staged = []
    for source in sources:
        if isinstance(source, ArraySource):
            stage = SharedMemoryStage(source.array, source.name)
            runner.stages.append(stage)
            runner.shared_paths.append(stage.path)
            source = stage.source
        staged.append(source)
    return staged


