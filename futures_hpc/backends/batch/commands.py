"""Running a batch system's commands: one place for timeouts, errors and cancelling.

Every command futures_hpc runs on a batch system (queue queries, cancels, the ``futures-hpc``
command's listings) goes through :func:`run_command` (lenient: None when it cannot be run) or
:func:`read_command` (strict: raises with the command's own message).
"""

from __future__ import annotations

import logging
import shlex
import subprocess

logger = logging.getLogger("futures_hpc")

#: What :func:`read_command` raises when a command fails, cannot be run or does not answer.
COMMAND_ERRORS = (RuntimeError, OSError, subprocess.TimeoutExpired)

#: Seconds to wait for the batch system to accept (or refuse) a job.
SUBMISSION_TIMEOUT_SECONDS = 120.0
#: Seconds a cancel or queue-state command may take.
COMMAND_TIMEOUT_SECONDS = 60.0


def run_command(command: list[str]) -> subprocess.CompletedProcess[str] | None:
    """Run a batch-system command; None if it cannot be run or does not answer in time."""
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("%s failed: %r", shlex.join(command), error)
        return None


def cancel_command_line(cancel_command: str, job_ids: list[str]) -> list[str]:
    """The command line that cancels ``job_ids`` in one call of ``cancel_command``."""
    return [*shlex.split(cancel_command), *job_ids]


def cancel_job_ids(cancel_command: str, job_ids: list[str]) -> bool:
    """Cancel ``job_ids`` with one ``cancel_command`` call; False if it could not be run.

    Synchronous on purpose: it must work from a signal handler and at interpreter exit, when
    neither the event loop nor a thread pool can be relied on. A non-zero exit status counts as
    done: it is common when some of the jobs have just ended.
    """
    if not job_ids:
        return True
    command = cancel_command_line(cancel_command, job_ids)
    result = run_command(command)
    if result is None:
        return False
    if result.returncode != 0:
        logger.debug("%s exited with %s: %s", shlex.join(command), result.returncode,
                     (result.stderr or result.stdout).strip())
    logger.info("cancelled jobs %s", " ".join(job_ids))
    return True




def read_command(command: list[str], timeout: float = COMMAND_TIMEOUT_SECONDS) -> str:
    """Run a batch-system command and return its standard output.

    Raises
    ------
    RuntimeError
        When it exits with a non-zero status (with its own message).
    OSError, subprocess.TimeoutExpired
        When it cannot be run or does not answer within ``timeout`` seconds.

    """
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False,
        stdin=subprocess.DEVNULL,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({completed.returncode}): "
            f"{(completed.stderr or completed.stdout).strip()}"
        )
    return completed.stdout
