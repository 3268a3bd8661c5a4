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
from ...worker_closing import close_workers, job_worker_addresses
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



#: Seconds the job array submitter waits, from the first job of a scaling step, for the
#: others (dask starts the jobs of one step concurrently, all within one event loop turn).
ARRAY_GATHER_SECONDS = 0.2
#: Stands for the worker command in a job script, while scripts are compared.
_WORKER_COMMAND_MARK = "@futures_hpc-worker-command@"


class JobArraySubmitter:
    """Submits the jobs started together (one scaling step) as job arrays (``job_array=True``).

    Jobs hand themselves over in :meth:`submit`; after :data:`ARRAY_GATHER_SECONDS` from the
    first, the gathered jobs are grouped by their script with the worker command left out
    (elements of one array share directives and prologue: jobs of different pools go to
    different arrays). A group of several jobs becomes one array script whose elements each
    run the worker command of their own job, picked by the element's index (a ``case`` on
    ``$SLURM_ARRAY_TASK_ID`` or ``$SGE_TASK_ID``), and goes out in one submission; each job
    then holds its element's id (``1234_3``), which the queue queries, the cancel command and
    the watcher take like any job id. A job alone submits itself as before.

    Parameters
    ----------
    system : BatchSystem
        The batch system (its array directives, element ids, script adjustments).
    job_book : JobBook
        Where the elements' submissions are recorded.
    throttle : int or None
        At most this many elements of each array run at once (SLURM ``%N``, Grid Engine
        ``-tc N``); None: all of them.

    """

    def __init__(self, system: BatchSystem, job_book: JobBook,
                 throttle: int | None = None) -> None:
        self.system = system
        self.job_book = job_book
        self.throttle = throttle
        #: Array submissions made, and the ids of the arrays (for status and tests).
        self.array_ids: list[str] = []
        self._gathered: list[tuple[Any, asyncio.Future[str | None]]] = []
        self._flush_task: asyncio.Task[None] | None = None

    async def submit(self, job: Any) -> str | None:
        """Submit ``job`` with the others of its step: its element's id, or None when alone.

        The caller has counted the submission as started in the book; an element's outcome is
        recorded here (even when the caller stops waiting). A refusal raises
        :class:`JobSubmissionError`.
        """
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._gathered.append((job, future))
        if self._flush_task is None:
            self._flush_task = asyncio.ensure_future(self._flush_later())
        return await asyncio.shield(future)

    async def _flush_later(self) -> None:
        await asyncio.sleep(ARRAY_GATHER_SECONDS)
        gathered, self._gathered, self._flush_task = self._gathered, [], None
        groups: dict[str, list[tuple[Any, asyncio.Future[str | None]]]] = {}
        for job, future in gathered:
            groups.setdefault(self._shape_of(job), []).append((job, future))
        await asyncio.gather(*(self._submit_group(members) for members in groups.values()))

    @staticmethod
    def _shape_of(job: Any) -> str:
        """The job's script without its worker command (unique when that cannot be cut out)."""
        script = job.job_script()
        if script.count(job.worker_command) != 1 or not script.startswith("#!"):
            return f"{id(job)}"
        return script.replace(job.worker_command, _WORKER_COMMAND_MARK)

    async def _submit_group(self, members: list[tuple[Any, asyncio.Future[str | None]]]
                            ) -> None:
        # Elements in the order of the jobs' names (``...-2`` before ``...-10``).
        members = sorted(members, key=lambda member: (len(member[0].name), member[0].name))
        jobs = [job for job, _ in members]
        if len(members) == 1:
            _resolve(members[0][1], None)  # alone: the job submits itself
            return
        try:
            array_id = await self._submit_array(jobs)
        except BaseException as error:
            for job, future in members:
                self.job_book.submission_finished(job.name, None, str(error), job.cancel_command)
                if future.done():
                    continue
                if isinstance(error, Exception):
                    future.set_exception(error)
                else:  # cancelled (the loop is closing): so are the jobs waiting
                    future.cancel()
            if not isinstance(error, Exception):
                raise
            return
        self.array_ids.append(array_id)
        first = self.system.array_first_index
        for index, (job, future) in enumerate(members, start=first):
            element_id = self.system.array_element_id(array_id, index)
            self.job_book.submission_finished(job.name, element_id, None, job.cancel_command,
                                              array_id=array_id)
            _resolve(future, element_id)

    async def _submit_array(self, jobs: list[Any]) -> str:
        """Write the array script of ``jobs`` (each its own element), submit it; the array id."""
        system, first = self.system, self.system.array_first_index
        last = first + len(jobs) - 1
        leader = jobs[0]
        directives = "\n".join(
            f"{system.directive_prefix} {line}"
            for line in system.array_directives(first, last, min(self.throttle or len(jobs),
                                                                 len(jobs))))
        variable = system.array_task_variable
        cases = "\n".join(f"  {index}) {job.worker_command} ;;"
                          for index, job in enumerate(jobs, start=first))
        choice = (
            f'case "${{{variable}}}" in\n{cases}\n'
            f'  *) echo "futures_hpc: no worker for array element ${{{variable}}}" >&2; '
            "exit 1 ;;\nesac"
        )
        shebang, _, rest = self._shape_of(leader).partition("\n")
        header = leader.job_header or ""
        if header and header in rest:  # the array's directives go after the job's
            rest = rest.replace(header, f"{header}\n{directives}", 1)
        else:
            rest = f"{directives}\n{rest}"
        script = system.array_script(f"{shebang}\n{rest}".replace(_WORKER_COMMAND_MARK, choice))
        path = Path(leader.log_directory) / f"{leader.name}-array{len(jobs)}.sh"
        path.write_text(script)
        for job in jobs:  # each job's script path (in messages) leads to the array's
            link = Path(job.log_directory) / f"{job.name}.sh"
            try:
                link.unlink(missing_ok=True)
                link.symlink_to(path.name)
            except OSError:  # a file system without links: a copy
                link.write_text(script)
        output = await leader.submit_job_script(str(path))
        match = re.search(leader.job_id_regexp, output)
        if match is None or not match.groupdict().get("job_id"):
            raise JobSubmissionError(
                f"no job id in the answer of {system.submit_command} to {path}:\n{output}")
        array_id = match.group("job_id")
        logger.info("submitted %d jobs as %s job array %s (%s)", len(jobs), system.title,
                    array_id, " ".join(job.name for job in jobs))
        return array_id


def _resolve(future: asyncio.Future[str | None], value: str | None) -> None:
    if not future.done():
        future.set_result(value)


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
    job_arrays : JobArraySubmitter, optional
        Submit the job as an element of an array with the jobs started at the same time.

    """

    job_id: str | None
    name: str
    log_directory: str
    submit_command: str
    cancel_command: str

    def __init__(self, *args: Any, job_book: JobBook, memory_request: bool = True,
                 job_arrays: JobArraySubmitter | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._job_book = job_book
        self._job_arrays = job_arrays
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
        """Submit the job; record the job id, or the batch system's refusal.

        With job arrays, the job goes out as an element of an array with the jobs started at
        the same time, unless it is alone.
        """
        self._job_book.submission_started()
        if self._job_arrays is not None:
            try:
                element_id = await self._job_arrays.submit(self)
            except BaseException:
                self.status = Status.failed
                raise
            if element_id is not None:  # recorded in the book by the submitter
                self.job_id = element_id
                # Relies on: ``Job.start`` being submission followed by
                # ``ProcessInterface.start`` (which marks the job running); the submission
                # was the array's.
                await ProcessInterface.start(self)  # type: ignore[arg-type]
                return
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
        """Close the workers, cancel every job with one command, then close as dask-jobqueue does.

        Idle workers are asked to close first and given a few seconds to disconnect
        (:mod:`futures_hpc.worker_closing`), so that their plugins' teardowns run and their
        scratch directories go; the jobs are cancelled whether they did or not. Workers still
        running a call (Ctrl-C, ``shutdown(cancel_futures=True)``) are not waited for.
        """
        self.job_book.begin_closing()
        scheduler = getattr(self, "scheduler", None)
        if hasattr(scheduler, "close_worker"):  # a scheduler in this process
            try:
                idle = [address for address in job_worker_addresses(scheduler, self.workers)
                        if not scheduler.workers[address].processing]
                await close_workers(scheduler, idle)
            except Exception as error:  # never in the way of the cancel
                logger.debug("closing the workers before their jobs failed: %r", error)
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
