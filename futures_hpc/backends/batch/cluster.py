"""The dask-jobqueue glue of the batch backends: job and cluster classes that keep the book.

This is the only module of :mod:`futures_hpc.backends.batch` that imports dask-jobqueue or
names anything private of dask-jobqueue or distributed; each such use says what it relies on.
The system modules name their dask-jobqueue cluster class (``BatchSystem.jobqueue_cluster``)
and :func:`cluster_class_for` makes the futures_hpc subclass of it on first use.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dask.config
import dask_jobqueue
from dask_jobqueue.core import Job, JobQueueCluster
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface
from distributed.deploy.utils import nprocesses_nthreads

from ...engine import ClusterHooks, JobHooks, job_keyword_arguments
from ...errors import JobSubmissionError
from .commands import SUBMISSION_TIMEOUT_SECONDS
from .jobs import JobBook
from .system import BatchSystem

logger = logging.getLogger("futures_hpc")

# Options the executor sets from the common vocabulary (or that would break it); the rest of
# dask-jobqueue's parameters pass through.
_OWNED_PARAMETERS = frozenset({
    "self", "n_workers", "job_cls", "loop", "asynchronous", "security", "protocol", "name",
    "job_name", "scheduler", "cores", "memory", "processes", "queue", "account", "walltime",
    "python", "log_directory", "job_extra", "job_extra_directives", "job_script_prologue",
    "env_extra", "extra", "header_skip", "dashboard_address", "host",
})


def jobqueue_parameters(job_class: type) -> frozenset[str]:
    """The keyword arguments of a dask-jobqueue cluster whose jobs are ``job_class``."""
    names: set[str] = set()
    for function in (JobQueueCluster.__init__, job_class.__init__, Job.__init__):
        names.update(
            parameter.name
            for parameter in inspect.signature(function).parameters.values()
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)
        )
    return frozenset(names - _OWNED_PARAMETERS)



class _BookkeepingJob(JobHooks):
    """Mixin for a dask-jobqueue ``Job``: persistent script, clear errors, bookkeeping.

    Takes the ``Job``'s own arguments and these:

    Parameters
    ----------
    job_book : JobBook
        Where submissions and cancellations are recorded.
    memory_request : bool
        False when no memory was asked for: the worker then takes its limit from the job's
        (``--memory-limit auto``) instead of dask-jobqueue's placeholder.

    """

    job_id: str | None
    name: str
    log_directory: str
    submit_command: str
    cancel_command: str

    def __init__(self, *args: Any, job_book: JobBook, memory_request: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._job_book = job_book
        if not memory_request:
            self.worker_command = re.sub(
                r"--memory-limit \S+", "--memory-limit auto", self.worker_command
            )

    @contextmanager
    def job_file(self) -> Iterator[str]:
        """Write the job script into the run's log directory, where it stays for debugging."""
        path = Path(self.log_directory) / f"{self.name}.sh"
        path.write_text(self.job_script())
        yield str(path)

    async def submit_job_script(self, script_filename: str) -> str:
        """Submit from the log directory (so wrappers' default log paths land there).

        Unlike dask-jobqueue's own submission, a refusal keeps the batch system's message.
        """
        command = [*shlex.split(self.submit_command), script_filename]
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, cwd=self.log_directory,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), SUBMISSION_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            process.kill()
            raise JobSubmissionError(
                f"{shlex.join(command)} did not answer within {SUBMISSION_TIMEOUT_SECONDS:.0f} s"
            ) from None
        if process.returncode != 0:
            message = "\n".join(
                text.strip() for text in (err.decode(), out.decode()) if text.strip()
            )
            # Without the script's path, so that identical refusals read as one.
            raise JobSubmissionError(
                f"{command[0]} failed (exit status {process.returncode}):\n"
                f"{message or '(no output)'}"
            )
        return out.decode()

    async def start(self) -> None:
        """Submit the job; record the job id, or the batch system's refusal."""
        self._job_book.submission_started()
        try:
            await super().start()  # type: ignore[misc]
        except BaseException as error:
            self.status = Status.failed
            self._job_book.submission_finished(self.name, None, str(error), self.cancel_command)
            raise
        self._job_book.submission_finished(self.name, self.job_id, None, self.cancel_command)

    async def close(self) -> None:
        """Cancel the job unless the cluster already did, for all its jobs at once."""
        if self.job_id:
            self._job_book.cancel(self.cancel_command, [self.job_id])
        # Relies on: ``Job.close`` being ``_close_job`` (which cancels one job) followed by
        # ``ProcessInterface.close``; we skip the first, the book already cancelled the job.
        await ProcessInterface.close(self)  # type: ignore[arg-type]


class _BookkeepingCluster(ClusterHooks):
    """Mixin for a dask-jobqueue cluster: one cancel command for all jobs; quiet failures."""

    job_cls: type
    workers: dict[str, Any]
    worker_spec: dict[str, Any]

    @property
    def job_book(self) -> JobBook:
        """The book shared with the cluster's jobs (passed to each job through the cluster)."""
        return job_keyword_arguments(self)["job_book"]

    async def correct_state(self) -> None:
        """Start and stop jobs to match ``worker_spec``; a refused submission is only logged.

        The executor raises it, with the batch system's message; here it would otherwise end in
        the event loop's log only.
        """
        # Jobs whose spec was removed are closed on purpose (scaled down, by any policy): their
        # end is no failure.
        self.job_book.mark_retired([
            job.job_id for name, job in list(self.workers.items())
            if name not in self.worker_spec and getattr(job, "job_id", None)
        ])
        try:
            await super().correct_state()
        except Exception as error:
            # A refused submission: the executor raises it, with the batch system's message.
            logger.debug("submitting jobs failed: %s", error)
        for name, job in list(self.workers.items()):
            if job.status == Status.failed:
                # Forget it, so that closing does not trip over it and nothing resubmits it.
                del self.workers[name]
                self.worker_spec.pop(name, None)

    async def close_cluster(self) -> None:
        """Cancel every job with one command, then close as dask-jobqueue does."""
        self.job_book.begin_closing()
        # Synchronous (a few tens of ms): at interpreter exit no thread pool takes work.
        self.job_book.cancel(self.job_cls.cancel_command)
        await super().close_cluster()


@functools.cache
def cluster_class_for(system: BatchSystem) -> type[JobQueueCluster]:
    """The futures_hpc subclass of the system's dask-jobqueue cluster (made once per system).

    Its jobs are the matching subclass of the cluster's ``job_cls``, with the book-keeping of
    :class:`_BookkeepingJob`.
    """
    # Relies on: dask_jobqueue exporting the cluster class by name, and the cluster class's
    # ``job_cls`` attribute naming its job class (both documented for subclassing).
    base = getattr(dask_jobqueue, system.jobqueue_cluster)
    job_class = type(f"_{base.job_cls.__name__}", (_BookkeepingJob, base.job_cls),
                     {"__module__": __name__})
    return type(f"_{base.__name__}", (_BookkeepingCluster, base),
                {"__module__": __name__, "job_cls": job_class})


@functools.cache
def jobqueue_option_names(system: BatchSystem) -> frozenset[str]:
    """The dask-jobqueue parameters that pass through as the system's backend options."""
    job_class = getattr(dask_jobqueue, system.jobqueue_cluster).job_cls
    return jobqueue_parameters(job_class) - system.unused_jobqueue_parameters


def automatic_processes(cluster_class: type[JobQueueCluster], cores: int) -> int:
    """dask-jobqueue's own choice of worker processes per job of ``cores`` cores.

    Its config key ``jobqueue.<system>.processes``, else about the square root of the cores.
    """
    config_name = cluster_class.job_cls.config_name
    automatic = dask.config.get(f"jobqueue.{config_name}.processes", None)
    if not isinstance(automatic, int) or automatic < 1:
        # Relies on: distributed.deploy.utils.nprocesses_nthreads, the helper dask-jobqueue
        # itself uses for its default (not documented API; present since distributed 2.x).
        automatic, _ = nprocesses_nthreads(cores)
    return automatic
