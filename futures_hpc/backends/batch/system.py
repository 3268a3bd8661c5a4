"""The contract of a batch system's module, and the job-name prefix every batch job carries.

A batch system (SLURM, PBS, Grid Engine; HTCondor or LSF next) is one module of this package
that defines:

- ``SYSTEM``: an instance of a :class:`BatchSystem` subclass, which knows how to detect the
  system, read its queue (states, why a job waits, whether it ended), list a user's jobs and
  cancel jobs; it imports nothing of dask-jobqueue, so that detection and the ``futures-hpc``
  command work where dask-jobqueue is not installed;
- its executor: a subclass of :class:`~futures_hpc.backends.batch.executor.JobQueueExecutor`
  with ``system = SYSTEM`` and, when the system needs it, its own mapping of the common options
  onto directives (``_scheduler_options``).

``docs/backends/writing-a-backend.md`` describes the contract for authors of a new system.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, ClassVar

from ...errors import OptionError
from .commands import cancel_command_line
from .jobs import QueueState

#: Every batch job futures_hpc submits has a name starting with this: it is the start of the
#: run name (``HPCExecutor.run_name``, ``fhpc-xxxxxxxx``) that names the run's jobs.
JOB_NAME_PREFIX = "fhpc-"


@dataclass(frozen=True)
class QueuedJob:
    """One batch job of a user whose name marks it as futures_hpc's (``fhpc-...``).

    Attributes
    ----------
    scheduler : str
        The batch system's backend name (``"slurm"``, ``"pbs"``, ``"sge"``).
    job_id : str
        The batch system's job id.
    name : str
        The job's name.
    state : str
        The batch system's state of the job.

    """

    scheduler: str
    job_id: str
    name: str
    state: str


class BatchSystem:
    """What futures_hpc knows of one batch system; each system module has one, ``SYSTEM``.

    A subclass sets the class attributes and implements :meth:`query_job_states`,
    :meth:`state_is_active` and :meth:`list_user_jobs`; it may refine :meth:`detect` and
    :meth:`unavailable_reason`.

    Attributes
    ----------
    name : str
        The backend name (``HPCExecutor(name)``), also the module's name.
    title : str
        The system's name in messages (``"SLURM"``, ``"Grid Engine"``).
    jobqueue_cluster : str
        The name of dask-jobqueue's cluster class (``"SLURMCluster"``); its ``job_cls`` is the
        job class whose parameters pass through as backend options.
    submit_command, query_command, cancel_command : str
        The commands that submit a job script, list jobs, and cancel jobs (given their ids).
    unused_jobqueue_parameters : frozenset of str
        dask-jobqueue parameters the system does not read, refused as backend options.

    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    jobqueue_cluster: ClassVar[str] = ""
    submit_command: ClassVar[str] = ""
    query_command: ClassVar[str] = ""
    cancel_command: ClassVar[str] = ""
    unused_jobqueue_parameters: ClassVar[frozenset[str]] = frozenset()
    #: Backend options futures_hpc reads itself instead of passing them to dask-jobqueue.
    own_option_names: ClassVar[frozenset[str]] = frozenset()

    @property
    def required_commands(self) -> tuple[str, ...]:
        """The commands that must be on PATH: submit, query, cancel."""
        return tuple(dict.fromkeys(
            (self.submit_command, self.query_command, self.cancel_command)
        ))

    def detect(self) -> str | None:
        """What shows this system is the one here (``"found sbatch at /usr/bin/sbatch"``).

        The registry's auto-detection and ``futures-hpc jobs``/``cancel`` both use this, and
        nothing else, to find the system. The default: the submit command is on PATH.

        Returns
        -------
        str or None
            What was found, or None when the system is not here.

        """
        path = shutil.which(self.submit_command)
        return f"found {self.submit_command} at {path}" if path else None

    def unavailable_reason(self) -> str | None:
        """Say which of the system's commands are missing from PATH, or None if all are there."""
        required = self.required_commands
        missing = [command for command in required if shutil.which(command) is None]
        if not missing:
            return None
        return (
            f"the {self.name!r} backend needs the {self.title} commands "
            f"{', '.join(required)}, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not on PATH "
            f"({os.environ.get('PATH', '')})"
        )

    def query_job_states(self, job_ids: list[str], memory: dict[str, Any]
                         ) -> dict[str, QueueState] | None:
        """Ask the system for these jobs' states and reasons; ``"gone"`` for unlisted ones.

        Parameters
        ----------
        job_ids : list of str
            Jobs of one executor.
        memory : dict
            A dict the executor keeps for the system across queries (for answers worth asking
            once per job, as Grid Engine's verification).

        Returns
        -------
        dict of str to QueueState, or None
            None when the system could not be asked (the watcher tries again later).

        """
        raise NotImplementedError

    def state_is_active(self, state: str) -> bool:
        """Whether a job in this state may still run a worker (False: it has ended)."""
        raise NotImplementedError

    def list_user_jobs(self, user: str) -> list[QueuedJob]:
        """The jobs of ``user`` whose name starts with :data:`JOB_NAME_PREFIX`.

        Raises
        ------
        RuntimeError, OSError, subprocess.TimeoutExpired
            When the queue cannot be read (``commands.COMMAND_ERRORS``).

        """
        raise NotImplementedError

    def check_own_options(self, backend_options: dict[str, Any]) -> None:
        """Check the options in :attr:`own_option_names` (default: non-empty names)."""
        for name in self.own_option_names:
            value = backend_options.get(name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise OptionError(f"{name}={value!r} is not allowed; it must be a non-empty name")

    def scheduler_options(self, resources: Any, backend_options: dict[str, Any], cores: int,
                          memory_request: bool) -> dict[str, Any]:
        """dask-jobqueue options that map the common options onto this system's directives.

        Parameters
        ----------
        resources : ResourceOptions
            The executor's common options.
        backend_options : dict
            The executor's backend options.
        cores : int
            Cores per job.
        memory_request : bool
            Whether the jobs ask for memory (a ``memory`` was given or configured).

        """
        return {"account": resources.account}

    def gpu_options(self, gpus: int, cores: int, memory_bytes: int | None) -> dict[str, Any]:
        """dask-jobqueue options that ask for ``gpus`` GPUs in each job (a pool's).

        Parameters
        ----------
        gpus : int
            GPUs per job (at least 1).
        cores : int
            Cores per job.
        memory_bytes : int or None
            Memory per job, if asked for.

        Returns
        -------
        dict
            Options for the job; ``job_extra_directives`` are added to the job's others.

        """
        return {"job_extra_directives": [f"-l gpu={gpus}"]}

    # -- job arrays (``job_array=True``) -------------------------------------------------------

    #: Why the system's executor cannot submit job arrays (None: it can).
    job_array_refusal: ClassVar[str | None] = "futures_hpc submits no job arrays on it"
    #: The environment variable that holds an array element's index inside the job.
    array_task_variable: ClassVar[str] = ""
    #: The index of an array's first element.
    array_first_index: ClassVar[int] = 0
    #: What starts a directive line in a job script (``"#SBATCH"``, ``"#$"``).
    directive_prefix: ClassVar[str] = ""

    def array_directives(self, first: int, last: int, throttle: int) -> list[str]:
        """The directive lines (without their prefix) of an array of elements ``first..last``.

        At most ``throttle`` elements run at once.
        """
        raise NotImplementedError

    def array_element_id(self, array_id: str, index: int) -> str:
        """The id of the array's element ``index``, as the queue and the cancel command take it."""
        raise NotImplementedError

    def array_script(self, script: str) -> str:
        """Adjust a job script for an array (e.g. log names per element); default: as is."""
        return script

    def cancel_command_line(self, job_ids: list[str]) -> list[str]:
        """The command that cancels ``job_ids`` in one call."""
        return cancel_command_line(self.cancel_command, job_ids)
