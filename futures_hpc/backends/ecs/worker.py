"""One dask worker as one ECS task: :class:`ECSWorkerTask`, an entry of the worker spec."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from distributed.core import Status
from distributed.deploy.spec import ProcessInterface

from .aws import AWSRequestError

logger = logging.getLogger("futures_hpc")


class TaskRunner(Protocol):
    """What a worker task needs of its run (:class:`~.run.ECSRun` is one)."""

    watched_workers: dict[str, Any]

    def run_worker(self, scheduler_address: str, worker_name: str,
                   shape: str | None = None) -> dict[str, Any]:
        """Start the task of ``worker_name`` (of a pool's ``shape``); return its description."""

    def stop_worker(self, task_arn: str) -> None:
        """Stop the task ``task_arn``."""


class ECSWorkerTask(ProcessInterface):
    """One dask worker running as one ECS task (an entry of the cluster's worker spec).

    Parameters
    ----------
    scheduler : str
        Address of the scheduler.
    name : str
        Name of the dask worker.
    run : TaskRunner
        The run that owns the task.
    shape : str, optional
        The pool whose worker this is (a key of the run's shapes), or None for the run's own.

    """

    def __init__(self, scheduler: str, name: str, run: TaskRunner, shape: str | None = None):
        super().__init__(scheduler=scheduler, name=name)
        self.scheduler_address = scheduler
        self.name = name
        self.run = run
        self.shape = shape
        self.task_arn: str | None = None
        self.stop_requested = False

    async def start(self) -> None:
        """Run the task; return as soon as ECS accepted it."""
        try:
            task = await asyncio.to_thread(self.run.run_worker, self.scheduler_address,
                                           self.name, self.shape)
        except BaseException:
            self.status = Status.failed
            raise
        self.task_arn = task["taskArn"]
        self.run.watched_workers[self.task_arn] = self
        await super().start()

    async def close(self) -> None:
        """Stop the task."""
        if self.task_arn is not None and not self.stop_requested:
            self.stop_requested = True
            try:
                await asyncio.to_thread(self.run.stop_worker, self.task_arn)
            except AWSRequestError as error:
                logger.warning("ECS: could not stop worker %s: %s", self.name, error)
        await super().close()

    def __repr__(self) -> str:
        return f"<ECSWorkerTask {self.name}: {self.task_arn}, status={self.status.name}>"
