"""dask-ctl's entry point and the dask names of :mod:`futures_hpc.discovery`, re-exported.

``pyproject.toml`` registers :func:`discover` for dask-ctl; the code lives in
:mod:`futures_hpc.discovery`, which the executor uses itself.
"""

from ..discovery import (
    DiscoveredCluster,
    active_executor_count,
    discover,
    discovery_directory,
    read_discovery_record,
    register_for_discovery,
    restore_dask_scheduler,
    running_cluster_names,
    unregister_from_discovery,
    use_as_dask_scheduler,
)

__all__ = [
    "DiscoveredCluster",
    "active_executor_count",
    "discover",
    "discovery_directory",
    "read_discovery_record",
    "register_for_discovery",
    "restore_dask_scheduler",
    "running_cluster_names",
    "unregister_from_discovery",
    "use_as_dask_scheduler",
]
