"""Names, tags and limits the modules of the ECS backend share."""

#: ECS limit on the JSON text of a task's ``overrides``.
OVERRIDES_LIMIT = 8192
CONTAINER_NAME = "dask-worker"
NAME_PREFIX = "futures-hpc"
LOG_GROUP_PREFIX = "/futures-hpc/"
STOP_REASON = "futures_hpc: worker no longer needed"
TAG_CREATOR = "futures_hpc:created-by"
TAG_RUN = "futures_hpc:run"
TAG_HOST = "futures_hpc:host"
TAG_PID = "futures_hpc:pid"
TAG_CREATED = "futures_hpc:created"
TAG_WORKER = "futures_hpc:worker"
USER_AGENT = "futures_hpc-ecs"
TLS_CERTIFICATE_VARIABLE = "FUTURES_HPC_TLS_CERTIFICATE"
TLS_KEY_VARIABLE = "FUTURES_HPC_TLS_KEY"
