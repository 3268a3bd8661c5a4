"""dask settings that futures_hpc runs with, unless the user set them.

distributed's defaults suit a dashboard watched by a person; on a 2-core laptop or a 1-core
batch job, two of them take CPU from the calls all the time, even while the cluster is idle
(measured on 2 local workers, idle for 10 s: the client's process 0.72 s of CPU and each worker
0.46 s with distributed's defaults; 0.43 s and 0.13 s with these):

- ``distributed.admin.tick.interval``, 20 ms: every scheduler, nanny and worker wakes its event
  loop 50 times a second only to measure how late the wake-up was, for the "event loop was
  unresponsive" warning (given after 3 s). futures_hpc uses 200 ms: the warning still comes.
- ``distributed.worker.profile.interval``, 10 ms: every worker samples its threads' stacks 100
  times a second for the dashboard's profile. futures_hpc uses 100 ms: the profile stays, with
  a sample per 100 ms.
- ``distributed.admin.system-monitor.interval``, 500 ms: the scheduler, every nanny and every
  worker read their process's CPU, memory, open files, disk and network counters twice a second
  for the dashboard's system charts and the workers' heartbeats. The local backend's nannies
  live in the client's process, so with 64 local workers its 65 monitors took about a tenth of
  a core from the client (40.4 % of a core idle, 29.5 % at 2 s). futures_hpc uses 2 s: the
  charts stay, a point every 2 s; the memory figures that spilling, pausing and the nanny's
  memory limit act on are read on their own, at ``distributed.worker.memory.monitor-interval``.

:func:`apply_dask_settings` sets them with dask's public :func:`dask.config.set` where the
value is still distributed's default: a value the user set (a YAML file, a ``DASK_...``
variable, :func:`dask.config.set`) is kept.
Worker processes that a batch system or ECS starts read their settings from their own
environment: :func:`worker_environment` gives the ``DASK_...`` variables that pass the client's
values on to them.
"""

from __future__ import annotations

import dask.config

#: futures_hpc's values of dask settings, by dotted name.
DASK_SETTINGS: dict[str, str] = {
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.profile.interval": "100ms",
    "distributed.admin.system-monitor.interval": "2s",
}


def apply_dask_settings() -> None:
    """Give each setting of :data:`DASK_SETTINGS` futures_hpc's value, unless the user set it.

    A setting is the user's when its value differs from the default that dask's config system
    holds for it (distributed's, from its YAML file); only a default is replaced. Applied at
    every executor start, so that a :func:`dask.config.refresh` in between does not undo it.
    """
    import distributed  # noqa: F401  (its defaults are registered on import)

    shipped = dask.config.merge(*dask.config.defaults)
    for name, value in DASK_SETTINGS.items():
        if dask.config.get(name, None) == dask.config.get(name, None, config=shipped):
            dask.config.set({name: value})


def worker_environment() -> dict[str, str]:
    """``DASK_...`` variables giving worker processes started elsewhere this process's values.

    Returns
    -------
    dict
        One variable per name of :data:`DASK_SETTINGS`, with the value this process's dask
        config holds (futures_hpc's, or the user's own).
    """
    apply_dask_settings()
    return {
        "DASK_" + name.upper().replace(".", "__").replace("-", "_"): str(dask.config.get(name))
        for name in DASK_SETTINGS
    }
