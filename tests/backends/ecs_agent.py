"""Test rig for the ECS backend: a moto server and a helper that plays the ECS container agent.

moto answers the ECS, EC2 and CloudWatch Logs APIs but runs no containers and has no container
agent. This module supplies both missing halves so that the whole chain runs for real:

* :func:`serve` runs ``moto_server`` in this process (``python ecs_agent.py serve --port N``)
  after adding the two calls of the real ECS *agent* API that moto lacks,
  ``SubmitContainerStateChange`` and ``SubmitTaskStateChange``, so container exit codes and
  stop codes are recorded the way ECS records them. It also makes ``StopTask`` on a stopped
  task a no-op (as on AWS), gives tasks stopped by ``StopTask`` the stop code ``UserInitiated``,
  runs ``RunTask`` with a ``FARGATE``/``FARGATE_SPOT`` capacity provider strategy as a Fargate
  task (moto otherwise ignores the strategy), accepts an EC2 task definition whose containers
  have ``memoryReservation`` but no ``memory`` (as ECS does), and, when IAM is enforced,
  answers a refused ECS call in ECS's JSON error format (moto answers in XML, which botocore
  cannot read for ECS).
* :class:`MotoServer` starts that server on a free loopback port with the request recorder on,
  freezes the task state progression, and reads the recorded requests.
* :class:`ECSAgent` is a thread that does what the ECS agent does on a container instance:
  it registers EC2 instances whose user data names an ECS cluster as container instances,
  starts every RUNNING task's container command as a local process (task definition
  environment + container overrides, over this machine's environment without its ``DASK_``,
  ``AWS_`` and ``FSSPEC_`` variables), ships its output to CloudWatch Logs when the task
  definition asks for ``awslogs``, reports the exit code and stops the task when the process
  exits, and kills the process when the client stops the task.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

#: Identifies the agent's own requests in the emulator's request log.
AGENT_USER_AGENT = "ecs-agent-emulator"
ESSENTIAL_CONTAINER_EXITED = "Essential container in task exited"
DUMMY_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: Variables of this process that the container processes do not inherit.
CLIENT_ONLY_PREFIXES = ("DASK_", "AWS_", "FSSPEC_")


# --------------------------------------------------------------------------------------------
# the emulator: moto server plus the agent API
# --------------------------------------------------------------------------------------------
def _find_task(backend: Any, cluster: str, task: str) -> Any:
    """Return moto's Task object for a task ARN or id."""
    cluster_name = cluster.split("/")[-1]
    task_id = task.split("/")[-1]
    for task_arn, task_object in backend.tasks.get(cluster_name, {}).items():
        if task_arn.endswith(task_id):
            return task_object
    raise KeyError(f"no task {task} in cluster {cluster}")


def _install_agent_api() -> None:
    """Add the agent API and the AWS behaviours moto lacks (see the module docstring)."""
    from moto.core.responses import ActionResult
    from moto.ecs.models import EC2ContainerServiceBackend
    from moto.ecs.responses import EC2ContainerServiceResponse

    def submit_container_state_change(self: Any) -> ActionResult:
        task = _find_task(self.ecs_backend, self._get_param("cluster", "default"),
                          self._get_param("task"))
        for container in task.containers:
            if container.name == self._get_param("containerName"):
                container.last_status = self._get_param("status")
                if self._get_param("exitCode") is not None:
                    container.exitCode = self._get_param("exitCode")
                container.reason = self._get_param("reason")
        return ActionResult({"acknowledgment": "ACK"})

    def submit_task_state_change(self: Any) -> ActionResult:
        cluster = self._get_param("cluster", "default")
        task = _find_task(self.ecs_backend, cluster, self._get_param("task"))
        if self._get_param("status") == "STOPPED" and task.last_status != "STOPPED":
            original_stop_task(self.ecs_backend, cluster, task.task_arn,
                               self._get_param("reason") or "")
            task.stop_code = "EssentialContainerExited"
        return ActionResult({"acknowledgment": "ACK"})

    original_stop_task = EC2ContainerServiceBackend.stop_task
    original_validate = EC2ContainerServiceBackend._validate_container_defs

    def validate_container_defs(memory: Any, container_definitions: Any,
                                requires_compatibilities: Any) -> None:
        # ECS accepts memoryReservation alone for EC2 tasks; moto wants memory.
        if memory is None and all("memoryReservation" in item
                                  for item in container_definitions):
            requires_compatibilities = [item for item in requires_compatibilities or []
                                        if item != "EC2"]
        original_validate(memory, container_definitions, requires_compatibilities)

    def stop_task(self: Any, cluster_str: str, task_str: str, reason: str) -> Any:
        task = _find_task(self, cluster_str, task_str)
        if task.last_status == "STOPPED":
            return task
        task = original_stop_task(self, cluster_str, task_str, reason)
        task.stop_code = "UserInitiated"
        return task

    original_run_task = EC2ContainerServiceResponse.run_task

    def run_task(self: Any) -> ActionResult:
        strategy = self._get_param("capacityProviderStrategy") or []
        providers = [item.get("capacityProvider") for item in strategy]
        if self._get_param("launchType") or not providers:
            return original_run_task(self)
        if set(providers) - {"FARGATE", "FARGATE_SPOT"}:
            return original_run_task(self)
        tasks = self.ecs_backend.run_task(
            self._get_param("cluster", "default"), self._get_param("taskDefinition"),
            self._get_int_param("count", 1), self._get_param("overrides"),
            self._get_param("startedBy"), self._get_param("tags"), "FARGATE",
            self._get_param("networkConfiguration"), self._get_param("group"),
            self._get_param("platformVersion"),
        )
        for task in tasks:
            task.capacity_provider_name = providers[0]
        return ActionResult({"tasks": tasks, "failures": []})

    original_call_action = EC2ContainerServiceResponse.call_action

    def call_action(self: Any) -> Any:
        status, headers, body = original_call_action(self)
        if int(status) == 403 and isinstance(body, str) and body.lstrip().startswith("<?xml"):
            code = re.search(r"<Code>(.*?)</Code>", body)
            message = re.search(r"<Message>(.*?)</Message>", body, flags=re.DOTALL)
            code_text = code.group(1) if code else "AccessDenied"
            if code_text == "AccessDenied":
                code_text = "AccessDeniedException"
            headers = {**headers, "status": "400",
                       "content-type": "application/x-amz-json-1.1"}
            body = json.dumps({"__type": code_text,
                               "message": message.group(1) if message else body})
            return 400, headers, body
        return status, headers, body

    EC2ContainerServiceResponse.call_action = call_action
    EC2ContainerServiceResponse.submit_container_state_change = submit_container_state_change
    EC2ContainerServiceResponse.submit_task_state_change = submit_task_state_change
    EC2ContainerServiceResponse.run_task = run_task
    EC2ContainerServiceBackend.stop_task = stop_task
    EC2ContainerServiceBackend._validate_container_defs = staticmethod(validate_container_defs)


def serve(host: str, port: int) -> None:
    """Run moto's server with the agent API added (blocks until killed)."""
    from moto.server import main

    _install_agent_api()
    main(["-H", host, "-p", str(port)])


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MotoServer:
    """A moto server process with the agent API, on a free loopback port.

    Parameters
    ----------
    workdir : pathlib.Path
        Holds the server's log and its request recording.
    environment : dict, optional
        Extra environment for the server (e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to enforce IAM).
    """

    def __init__(self, workdir: Path, environment: dict[str, str] | None = None):
        self.workdir = workdir
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.recording_path = workdir / f"moto-recording-{self.port}.jsonl"
        self.log_path = workdir / f"moto-server-{self.port}.log"
        self._environment = environment or {}
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoServer:
        """Start the server and wait until it answers; freeze ECS task states."""
        environment = dict(os.environ)
        environment.update({"MOTO_ENABLE_RECORDING": "True",
                            "MOTO_RECORDER_FILEPATH": str(self.recording_path)})
        environment.update(self._environment)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [sys.executable, __file__, "serve", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=environment,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).read()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start:\n"
                                       + self.log_path.read_text()) from None
                time.sleep(0.1)
        self.freeze_task_states()
        return self

    def stop(self) -> None:
        """Kill the server."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def _post(self, path: str, payload: dict[str, Any] | None = None) -> bytes:
        data = json.dumps(payload or {}).encode()
        request = urllib.request.Request(self.endpoint_url + path, data=data, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def freeze_task_states(self) -> None:
        """Keep tasks RUNNING until ``StopTask`` (moto advances them on every DescribeTasks)."""
        self._post("/moto-api/state-manager/set-transition",
                   {"model_name": "ecs::task",
                    "transition": {"progression": "manual", "times": 1_000_000_000}})

    def reset_recording(self) -> None:
        """Forget every request recorded so far."""
        self._post("/moto-api/recorder/reset-recording")

    def recorded_requests(self) -> list[dict[str, Any]]:
        """Requests received since the last reset, with ``user_agent``, ``target``, ``body``.

        moto appends one JSON line per request from the thread serving it, so a download can end
        in a line another client's request is still writing (the agent polls all the time). Such a
        download is taken again; a line still torn after that is kept whole as raw text in every
        field, so that a filter on the user agent still sees whose it was.
        """
        url = self.endpoint_url + "/moto-api/recorder/download-recording"
        for _attempt in range(20):
            with urllib.request.urlopen(url, timeout=10) as response:
                lines = response.read().decode().splitlines()
            requests, torn = [], False
            for line in lines:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    torn = True
                    requests.append({"headers": {}, "user_agent": line, "target": line,
                                     "body": line, "torn": True})
                    continue
                headers = {key.lower(): value for key, value in entry["headers"].items()}
                entry["user_agent"] = headers.get("user-agent", "")
                entry["target"] = headers.get("x-amz-target", "")
                body = entry.get("body") or ""
                if entry.get("body_encoded"):
                    body = base64.b64decode(body).decode(errors="replace")
                entry["body"] = body
                requests.append(entry)
            if not torn:
                break
            time.sleep(0.05)
        return requests

    def client(self, service: str, region: str = "us-east-1", user_agent: str = "",
               **credentials: str) -> Any:
        """A boto3 client on this server (dummy credentials unless given)."""
        config = Config(user_agent_extra=user_agent) if user_agent else None
        return boto3.client(service, region_name=region, endpoint_url=self.endpoint_url,
                            config=config, **(credentials or DUMMY_CREDENTIALS))


# --------------------------------------------------------------------------------------------
# the agent
# --------------------------------------------------------------------------------------------
@dataclass
class ContainerRun:
    """One task's container, run as a local process."""

    cluster_arn: str
    task_arn: str
    container_name: str
    argv: list[str]
    environment: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes]
    log_configuration: dict[str, Any] | None = None
    stopped_by_client: bool = False
    exit_code: int | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def task_id(self) -> str:
        """The last part of the task ARN."""
        return self.task_arn.split("/")[-1]


def _aws_pairs(entries: list[dict[str, str]] | None) -> dict[str, str]:
    return {entry["name"]: entry["value"] for entry in entries or []}


class ECSAgent:
    """Plays the ECS container agent on the emulator (see the module docstring).

    Parameters
    ----------
    server : MotoServer
        The emulator.
    workdir : pathlib.Path
        Where the containers' output files go.
    region : str
        The region whose clusters it serves.
    poll_interval : float
        Seconds between two looks at the emulator.
    """

    def __init__(self, server: MotoServer, workdir: Path, region: str = "us-east-1",
                 poll_interval: float = 0.2):
        self.server = server
        self.workdir = workdir
        self.region = region
        self.poll_interval = poll_interval
        self.runs: dict[str, ContainerRun] = {}
        self.errors: list[str] = []
        self.registered_instances: dict[str, tuple[str, str]] = {}
        self._instance_clusters: dict[str, str | None] = {}
        self._ecs = server.client("ecs", region, AGENT_USER_AGENT)
        self._ec2 = server.client("ec2", region, AGENT_USER_AGENT)
        self._logs = server.client("logs", region, AGENT_USER_AGENT)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ecs-agent", daemon=True)

    # life cycle --------------------------------------------------------------------------
    def start(self) -> ECSAgent:
        """Start polling in a thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling and kill every container process still alive."""
        self._stop.set()
        self._thread.join(10)
        for run in list(self.runs.values()):
            if run.process.poll() is None:
                self._kill(run)

    def __enter__(self) -> ECSAgent:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as error:  # keep playing the agent, but remember what went wrong
                self.errors.append(repr(error))
            self._stop.wait(self.poll_interval)

    def poll_once(self) -> None:
        """Do one round of the agent's work."""
        with self._lock:
            self._join_instances()
            self._start_new_tasks()
            self._reap_processes()
            self._kill_stopped_tasks()

    # queries for tests -------------------------------------------------------------------
    def live_processes(self) -> list[ContainerRun]:
        """Container processes still running."""
        return [run for run in self.runs.values() if run.process.poll() is None]

    def wait_for(self, predicate: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll ``predicate()`` until it returns a true value; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met in {timeout} s; agent errors: "
                                   f"{self.errors[-3:]}")
            time.sleep(interval)

    # container instances -----------------------------------------------------------------
    def _cluster_named_in_user_data(self, instance_id: str) -> str | None:
        if instance_id not in self._instance_clusters:
            attribute = self._ec2.describe_instance_attribute(InstanceId=instance_id,
                                                              Attribute="userData")
            encoded = attribute.get("UserData", {}).get("Value") or ""
            text = base64.b64decode(encoded).decode(errors="replace") if encoded else ""
            cluster = None
            for line in text.splitlines():
                if "ECS_CLUSTER=" in line:
                    cluster = line.split("ECS_CLUSTER=", 1)[1].split()[0].strip("'\"")
            self._instance_clusters[instance_id] = cluster
        return self._instance_clusters[instance_id]

    def _join_instances(self) -> None:
        reservations = self._ec2.describe_instances()["Reservations"]
        for reservation in reservations:
            for instance in reservation["Instances"]:
                instance_id = instance["InstanceId"]
                state = instance["State"]["Name"]
                if state == "running" and instance_id not in self.registered_instances:
                    self._register(instance_id)
                elif state in ("shutting-down", "terminated", "stopped"):
                    self._deregister(instance_id)

    def _register(self, instance_id: str) -> None:
        cluster = self._cluster_named_in_user_data(instance_id)
        if cluster is None:
            return
        clusters = self._ecs.describe_clusters(clusters=[cluster])["clusters"]
        if not clusters or clusters[0]["status"] != "ACTIVE":
            return
        document = json.dumps({"instanceId": instance_id, "region": self.region})
        response = self._ecs.register_container_instance(cluster=cluster,
                                                         instanceIdentityDocument=document)
        arn = response["containerInstance"]["containerInstanceArn"]
        self.registered_instances[instance_id] = (cluster, arn)

    def _deregister(self, instance_id: str) -> None:
        registration = self.registered_instances.get(instance_id)
        if registration is None:
            return
        cluster, arn = registration
        registered = self._ecs.list_container_instances(cluster=cluster)["containerInstanceArns"]
        if arn in registered:
            self._ecs.deregister_container_instance(cluster=cluster, containerInstance=arn,
                                                    force=True)
        self.registered_instances[instance_id] = (cluster, "")

    # tasks -------------------------------------------------------------------------------
    def _running_tasks(self) -> list[dict[str, Any]]:
        tasks = []
        for cluster_arn in self._ecs.list_clusters()["clusterArns"]:
            arns = self._ecs.list_tasks(cluster=cluster_arn,
                                        desiredStatus="RUNNING")["taskArns"]
            new_arns = [arn for arn in arns if arn not in self.runs]
            for start in range(0, len(new_arns), 100):
                described = self._ecs.describe_tasks(cluster=cluster_arn,
                                                     tasks=new_arns[start:start + 100])
                tasks.extend(task for task in described["tasks"]
                             if task["lastStatus"] == "RUNNING")
        return tasks

    def _start_new_tasks(self) -> None:
        for task in self._running_tasks():
            self._start_container(task)

    def _start_container(self, task: dict[str, Any]) -> None:
        definition = self._ecs.describe_task_definition(
            taskDefinition=task["taskDefinitionArn"])["taskDefinition"]
        container = definition["containerDefinitions"][0]
        overrides = next(
            (override for override in task.get("overrides", {}).get("containerOverrides", [])
             if override.get("name") == container["name"]), {})
        command = overrides.get("command") or container.get("command") or []
        argv = list(container.get("entryPoint") or []) + list(command)
        # A container does not see the client's environment: this machine's (PATH, PYTHONPATH
        # for the local interpreter) stands in for the image's, without the client's dask
        # config, AWS settings and credentials, or fsspec config (they must come in the task).
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith(CLIENT_ONLY_PREFIXES)}
        environment.update(_aws_pairs(container.get("environment")))
        environment.update(_aws_pairs(overrides.get("environment")))
        task_id = task["taskArn"].split("/")[-1]
        log_path = self.workdir / f"container-{task_id}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                       env=environment, cwd=self.workdir,
                                       start_new_session=True)
        self.runs[task["taskArn"]] = ContainerRun(
            cluster_arn=task["clusterArn"], task_arn=task["taskArn"],
            container_name=container["name"], argv=argv, environment=environment,
            log_path=log_path, process=process,
            log_configuration=container.get("logConfiguration"),
        )

    def _reap_processes(self) -> None:
        for run in self.runs.values():
            if run.exit_code is not None or run.process.poll() is None:
                continue
            returncode = run.process.returncode
            # Docker reports a process killed by signal N as exit code 128 + N
            run.exit_code = returncode if returncode >= 0 else 128 - returncode
            self._ship_logs(run)
            self._report_stopped(run)

    def _report_stopped(self, run: ContainerRun) -> None:
        """Tell ECS the container exited and so the task stopped, as the real agent does."""
        reason = None if run.exit_code == 0 else f"exited with code {run.exit_code}"
        arguments: dict[str, Any] = {"cluster": run.cluster_arn, "task": run.task_arn,
                                     "containerName": run.container_name,
                                     "status": "STOPPED", "exitCode": run.exit_code}
        if reason:
            arguments["reason"] = reason
        self._ecs.submit_container_state_change(**arguments)
        if not run.stopped_by_client:
            self._ecs.submit_task_state_change(cluster=run.cluster_arn, task=run.task_arn,
                                               status="STOPPED",
                                               reason=ESSENTIAL_CONTAINER_EXITED)

    def _kill_stopped_tasks(self) -> None:
        alive = [run for run in self.runs.values() if run.process.poll() is None]
        by_cluster: dict[str, list[ContainerRun]] = {}
        for run in alive:
            by_cluster.setdefault(run.cluster_arn, []).append(run)
        for cluster_arn, runs in by_cluster.items():
            arns = [run.task_arn for run in runs]
            described = self._ecs.describe_tasks(cluster=cluster_arn, tasks=arns)["tasks"]
            stopped = {task["taskArn"] for task in described
                       if task["desiredStatus"] == "STOPPED" or task["lastStatus"] == "STOPPED"}
            for run in runs:
                if run.task_arn in stopped:
                    run.stopped_by_client = True
                    self._kill(run)

    @staticmethod
    def _kill(run: ContainerRun, grace: float = 5.0) -> None:
        """SIGTERM the process group, then SIGKILL after ``grace`` seconds (as ECS does)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.process.pid, signal.SIGTERM)
        try:
            run.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()

    # logs --------------------------------------------------------------------------------
    def _ship_logs(self, run: ContainerRun) -> None:
        """Copy the container's output to CloudWatch Logs, as the ``awslogs`` driver does."""
        configuration = run.log_configuration or {}
        if configuration.get("logDriver") != "awslogs":
            return
        options = configuration.get("options", {})
        group = options["awslogs-group"]
        stream = f"{options['awslogs-stream-prefix']}/{run.container_name}/{run.task_id}"
        lines = run.log_path.read_text(errors="replace").splitlines() or ["(no output)"]
        now = int(time.time() * 1000)
        try:
            self._logs.create_log_stream(logGroupName=group, logStreamName=stream)
            self._logs.put_log_events(
                logGroupName=group, logStreamName=stream,
                logEvents=[{"timestamp": now, "message": line} for line in lines[-1000:]],
            )
        except ClientError as error:
            self.errors.append(f"awslogs: {error}")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "serve" and sys.argv[2] == "--port":
        serve("127.0.0.1", int(sys.argv[3]))
    else:
        sys.exit("usage: ecs_agent.py serve --port PORT")
