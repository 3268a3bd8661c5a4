"""The ECS backend end to end on an AWS API emulator (moto server) and an emulated ECS agent.

Nothing here is mocked inside futures_hpc: boto3 calls the real ECS/EC2/CloudWatch Logs APIs of
a ``moto_server`` process on loopback; :class:`tests.backends.ecs_agent.ECSAgent` plays the ECS
container agent, running each RUNNING task's container command as a local process with the
task's environment; that process is a real dask worker which connects over TLS to the scheduler
in this process. What each test checks in AWS it checks through the same APIs.
"""

from __future__ import annotations

import datetime
import glob
import http.server
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import boto3
import botocore.session
import dask.config
import distributed
import psutil
import pytest
from distributed.comm.core import CommClosedError
from distributed.security import Security

from conftest import require
from futures_hpc import HPCExecutor, JobFailedError, OptionError
from futures_hpc.backends.ecs import (
    LOG_GROUP_PREFIX,
    OVERRIDES_LIMIT,
    TAG_CREATED,
    TAG_HOST,
    TAG_PID,
    TAG_RUN,
    USER_AGENT,
    AWSRequestError,
    ECSCluster,
    ECSExecutor,
    _is_stale,
    fargate_options,
    private_options,
)
from futures_hpc.cli import main as cli_main
from futures_hpc.scaling import FairShareAdaptive
from tests.backends.ecs_agent import ECSAgent, MotoServer
from tests.executor_suite import *  # noqa: F403 - the shared executor suite

pytestmark = [pytest.mark.ecs, pytest.mark.timeout(240)]

REGION = "us-east-1"
#: Any image name: the emulated agent runs the container command locally instead.
IMAGE = "python:3.11-slim"
ECR_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/work:1"
EXECUTION_ROLE = "arn:aws:iam::123456789012:role/ecsTaskExecutionRole"
DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REPOSITORY = Path(__file__).resolve().parents[2]


# -- the rig ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    require(importlib.util.find_spec("moto") is not None
            and importlib.util.find_spec("flask") is not None,
            "the ECS tests need moto[server] (pip install 'moto[server]')")
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def agent(emulator, tmp_path_factory):
    with ECSAgent(emulator, tmp_path_factory.mktemp("containers")) as running_agent:
        yield running_agent


@pytest.fixture(scope="session")
def aws_session():
    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                         region_name=REGION)


@pytest.fixture(scope="session")
def network(emulator):
    ec2 = emulator.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])
    group = ec2.create_security_group(GroupName="futures-hpc-tests", VpcId=vpc["VpcId"],
                                      Description="dask scheduler and workers")
    iam = emulator.client("iam")
    profile = iam.create_instance_profile(InstanceProfileName="ecsInstanceRole")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"subnet": subnets["Subnets"][0]["SubnetId"], "security_group": group["GroupId"],
            "instance_profile_arn": profile["InstanceProfile"]["Arn"], "ami": ami}


@pytest.fixture(scope="session")
def emulator_options(emulator, agent, aws_session):
    """Options that point a cluster at the emulator and make its workers local processes."""
    return {"region": REGION, "endpoint_url": emulator.endpoint_url,
            "boto3_session": aws_session, "scheduler_host": "127.0.0.1",
            "python": sys.executable, "poll_interval": 0.3, "task_stop_timeout": 10,
            "dashboard_address": "localhost:0"}


@pytest.fixture(scope="session")
def fargate(emulator_options, network):
    """Options of a Fargate run; keyword arguments add or override."""

    def options(**extra):
        arguments = {"container_image": IMAGE, "subnet": network["subnet"],
                     "security_groups": [network["security_group"]], "cpu": 256,
                     "memory": 512, **emulator_options, **extra}
        return fargate_options(**arguments)

    return options


@pytest.fixture(scope="session")
def private(emulator_options, network):
    """Options of a private EC2 cluster run; keyword arguments add or override."""

    def options(**extra):
        arguments = {"container_image": IMAGE, "num_instances": 1, "ami": network["ami"],
                     "instance_type": "m6i.large",
                     "instance_profile_arn": network["instance_profile_arn"],
                     "subnet": network["subnet"], "security_groups": [network["security_group"]],
                     "instance_wait_timeout": 30, **emulator_options, **extra}
        return private_options(**arguments)

    return options


@pytest.fixture(scope="module", params=["fargate", "private"])
def ex(request, fargate, private):
    options = fargate() if request.param == "fargate" else private()
    with HPCExecutor("ecs", max_workers=2, **options) as executor:
        executor.client.wait_for_workers(2, timeout=60)
        yield executor


@pytest.fixture(params=["fargate", "private"])
def make_executor(request, fargate, private):
    options = fargate() if request.param == "fargate" else private()

    def make():
        executor = ECSExecutor(max_workers=2, **options)
        executor.client.wait_for_workers(2, timeout=60)
        return executor

    return make


# -- what the emulator holds --------------------------------------------------------------------


def _tags(items):
    return {item.get("key", item.get("Key")): item.get("value", item.get("Value"))
            for item in items or []}


def leftovers(emulator, agent, run_name):
    """Everything of run ``run_name`` that still exists or runs, described; [] when nothing."""
    ecs, ec2, logs = (emulator.client(name) for name in ("ecs", "ec2", "logs"))
    found, run_task_arns = [], set()
    cluster_arns = ecs.list_clusters()["clusterArns"]
    for cluster in ecs.describe_clusters(clusters=cluster_arns, include=["TAGS"])["clusters"]:
        if cluster["status"] == "ACTIVE" and _tags(cluster.get("tags")).get(TAG_RUN) == run_name:
            found.append(f"cluster {cluster['clusterName']}")
        task_arns = ecs.list_tasks(cluster=cluster["clusterArn"])["taskArns"]
        if task_arns:
            tasks = ecs.describe_tasks(cluster=cluster["clusterArn"], tasks=task_arns,
                                       include=["TAGS"])["tasks"]
            tasks = [task for task in tasks if _tags(task.get("tags")).get(TAG_RUN) == run_name]
            run_task_arns.update(task["taskArn"] for task in tasks)
            found += [f"task {task['taskArn']} {task['lastStatus']}" for task in tasks
                      if task["lastStatus"] != "STOPPED"]
    for arn in ecs.list_task_definitions(status="ACTIVE")["taskDefinitionArns"]:
        described = ecs.describe_task_definition(taskDefinition=arn, include=["TAGS"])
        if _tags(described.get("tags")).get(TAG_RUN) == run_name:
            found.append(f"task definition {arn}")
    reservations = ec2.describe_instances(
        Filters=[{"Name": f"tag:{TAG_RUN}", "Values": [run_name]}])["Reservations"]
    found += [f"instance {instance['InstanceId']} {instance['State']['Name']}"
              for reservation in reservations for instance in reservation["Instances"]
              if instance["State"]["Name"] != "terminated"]
    groups = logs.describe_log_groups(logGroupNamePrefix=LOG_GROUP_PREFIX + run_name)
    found += [f"log group {group['logGroupName']}" for group in groups["logGroups"]]
    found += [f"container process of {run.task_arn}" for run in agent.live_processes()
              if run.task_arn in run_task_arns]
    return found


def aws_only(items):
    """``leftovers`` without the agent's local container processes."""
    return [item for item in items if not item.startswith("container process of ")]


def resources_only(items):
    """``leftovers`` without tasks and the agent's container processes (they end on their own)."""
    return [item for item in aws_only(items) if not item.startswith("task ")]


def aws_leftovers(emulator, agent, run_name):
    return aws_only(leftovers(emulator, agent, run_name))


def wait_nothing_left(emulator, agent, run_name, timeout=20):
    """Wait until :func:`leftovers` is empty (the agent reaps killed workers asynchronously)."""
    deadline = time.monotonic() + timeout
    while (found := leftovers(emulator, agent, run_name)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def our_requests(emulator, marker=USER_AGENT):
    """Requests sent by futures_hpc (with ``marker`` in their user agent) since the last reset."""
    return [request for request in emulator.recorded_requests()
            if marker in request["user_agent"] and USER_AGENT in request["user_agent"]]


def marked_session(region=REGION):
    """A boto3 session whose requests carry a user-agent marker of their own, and the marker.

    Other clusters (the suite's module-scoped executor) poll the emulator meanwhile: the marker
    tells this test's requests from theirs.
    """
    marker = f"test-marker-{uuid.uuid4().hex[:8]}"
    core = botocore.session.Session()
    core.user_agent_extra = marker
    session = boto3.Session(botocore_session=core, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name=region)
    return session, marker


def run_tasks_of(emulator, cluster_arn):
    ecs = emulator.client("ecs")
    task_arns = ecs.list_tasks(cluster=cluster_arn)["taskArns"]
    if not task_arns:
        return []
    return ecs.describe_tasks(cluster=cluster_arn, tasks=task_arns, include=["TAGS"])["tasks"]


# -- the executor on Fargate and on a private cluster ---------------------------------------------


def test_backend_gives_ecs_executor_whose_workers_are_ecs_tasks(ex, emulator, agent):
    assert type(ex) is ECSExecutor and ex.backend_name == "ecs"
    assert ex.cluster.scheduler_address.startswith("tls://")
    resources = ex.cluster.created_resources
    tasks = [task for task in run_tasks_of(emulator, resources.cluster_arn)
             if task["lastStatus"] == "RUNNING"]
    assert len(tasks) == 2
    names = {task["overrides"]["containerOverrides"][0]["command"][
        task["overrides"]["containerOverrides"][0]["command"].index("--name") + 1]
        for task in tasks}
    assert names == {worker["name"] for worker in
                     ex.client.scheduler_info(n_workers=-1)["workers"].values()}
    pids = set(ex.map(lambda _: os.getpid(), range(20), chunksize=1))
    assert os.getpid() not in pids
    container_pids = {run.process.pid for run in agent.live_processes()}
    for pid in pids:   # the worker (under its nanny) runs in a container process of the agent
        process = psutil.Process(pid)
        assert {process.pid} | {parent.pid for parent in process.parents()} & container_pids


def test_fargate_tasks_and_task_definition(fargate, emulator):
    with ECSExecutor(max_workers=1, **fargate(cpu="0.5 vCPU", memory="1GB",
                                              cpu_architecture="ARM64")) as executor:
        assert executor.submit(sum, [1, 2]).result(timeout=60) == 3
        ecs = emulator.client("ecs")
        definition = ecs.describe_task_definition(
            taskDefinition=executor.cluster.created_resources.task_definition_arns[0]
        )["taskDefinition"]
        [task] = run_tasks_of(emulator, executor.cluster.created_resources.cluster_arn)
    assert definition["requiresCompatibilities"] == ["FARGATE"]
    assert (definition["cpu"], definition["memory"]) == ("512", "1024")
    assert definition["networkMode"] == "awsvpc"
    assert definition["runtimePlatform"]["cpuArchitecture"] == "ARM64"
    assert "BEGIN" not in json.dumps(definition), "TLS material must not be in the definition"
    assert task["launchType"] == "FARGATE"
    override = task["overrides"]["containerOverrides"][0]
    environment = {item["name"]: item["value"] for item in override["environment"]}
    assert "BEGIN CERTIFICATE" in environment["FUTURES_HPC_TLS_CERTIFICATE"]
    assert environment["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert executor.cluster.scheduler_address in override["command"]
    assert len(json.dumps(task["overrides"])) < OVERRIDES_LIMIT


def test_scheduler_refuses_whoever_lacks_the_run_certificate(ex):
    """TLS really is on: another certificate, or plain TCP, is refused."""
    with pytest.raises(CommClosedError, match="TLS certificate does not match"):
        distributed.Client(ex.cluster.scheduler_address, security=Security.temporary(),
                           timeout=5)
    with pytest.raises(CommClosedError):
        distributed.Client(ex.cluster.scheduler_address.replace("tls://", "tcp://"), timeout=5)


def test_environment_and_prologue_reach_the_workers(fargate):
    options = fargate(env={"FUTURES_HPC_TEST_VALUE": "42"},
                      prologue=["export FUTURES_HPC_FROM_PROLOGUE=yes"])
    with ECSExecutor(max_workers=1, **options) as executor:
        values = executor.submit(
            lambda: (os.environ.get("FUTURES_HPC_TEST_VALUE"),
                     os.environ.get("FUTURES_HPC_FROM_PROLOGUE"),
                     os.environ.get("FUTURES_HPC_TLS_KEY"))).result(timeout=60)
        # futures_hpc's dask settings (futures_hpc.dask_settings) come with the task too.
        settings = executor.submit(
            lambda: (dask.config.get("distributed.admin.tick.interval"),
                     distributed.get_worker().periodic_callbacks["tick"].callback_time,
                     dask.config.get("distributed.worker.profile.interval"))).result(timeout=60)
    assert values == ("42", "yes", None)
    assert settings == ("200ms", 200, "100ms")


def test_fargate_spot_and_public_ip(fargate, emulator):
    session, marker = marked_session()
    emulator.reset_recording()
    with ECSCluster(n_workers=1, **fargate(fargate_spot=True, assign_public_ip=True,
                                           boto3_session=session)) as cluster:
        with distributed.Client(cluster) as client:
            assert client.submit(sum, [2, 3]).result(timeout=60) == 5
        [task] = run_tasks_of(emulator, cluster.created_resources.cluster_arn)
        described = emulator.client("ecs").describe_clusters(
            clusters=[cluster.created_resources.cluster_arn])["clusters"][0]
    assert task["capacityProviderName"] == "FARGATE_SPOT"
    assert set(described["capacityProviders"]) == {"FARGATE", "FARGATE_SPOT"}
    [run_task] = [json.loads(request["body"]) for request in our_requests(emulator, marker)
                  if request["target"].endswith(".RunTask")]
    assert run_task["capacityProviderStrategy"][0]["capacityProvider"] == "FARGATE_SPOT"
    assert "launchType" not in run_task
    network = run_task["networkConfiguration"]["awsvpcConfiguration"]
    assert network["assignPublicIp"] == "ENABLED"


def test_private_cluster_places_tasks_on_its_instances(private, emulator, agent):
    with ECSExecutor(max_workers=2, **private(num_instances=2)) as executor:
        resources = executor.cluster.created_resources
        assert len(resources.instance_ids) == 2
        assert {instance_id for instance_id in resources.instance_ids
                if instance_id in agent.registered_instances} == set(resources.instance_ids)
        assert executor.submit(sum, [3, 4]).result(timeout=60) == 7
        tasks = run_tasks_of(emulator, resources.cluster_arn)
        instances = emulator.client("ecs").list_container_instances(
            cluster=resources.cluster_arn)["containerInstanceArns"]
        run_name = executor.cluster.run_name
    assert {task["launchType"] for task in tasks} == {"EC2"}
    assert {task["containerInstanceArn"] for task in tasks} <= set(instances)
    assert wait_nothing_left(emulator, agent, run_name) == []


def test_existing_cluster_is_used_and_kept(fargate, emulator, agent):
    ecs = emulator.client("ecs")
    ecs.create_cluster(clusterName="shared-cluster")
    with ECSCluster(n_workers=1, **fargate(cluster="shared-cluster")) as cluster:
        with distributed.Client(cluster) as client:
            assert client.submit(sum, [1, 1]).result(timeout=60) == 2
        assert cluster.created_resources.cluster_created is False
        run_name = cluster.run_name
        cluster_arn = cluster.created_resources.cluster_arn
    assert ecs.describe_clusters(clusters=["shared-cluster"])["clusters"][0]["status"] == "ACTIVE"
    assert all(task["lastStatus"] == "STOPPED" for task in run_tasks_of(emulator, cluster_arn))
    assert wait_nothing_left(emulator, agent, run_name) == []


# -- nothing left behind ------------------------------------------------------------------------


def test_nothing_left_after_normal_shutdown(fargate, emulator, agent):
    with ECSExecutor(max_workers=2, **fargate(log_group=True, execution_role_arn=EXECUTION_ROLE,
                                              tags={"project": "cleanup"})) as executor:
        assert sorted(executor.map(abs, range(-5, 5))) == sorted(abs(n) for n in range(-5, 5))
        run_name = executor.cluster.run_name
        assert leftovers(emulator, agent, run_name) != []   # the check can see the resources
    assert wait_nothing_left(emulator, agent, run_name) == []


@pytest.mark.parametrize("interruption", [ZeroDivisionError, KeyboardInterrupt])
def test_nothing_left_after_an_exception(fargate, emulator, agent, interruption):
    run_names = []
    with pytest.raises(interruption):
        with ECSExecutor(max_workers=1, **fargate(log_group=True,
                                                  execution_role_arn=EXECUTION_ROLE)) as executor:
            run_names.append(executor.cluster.run_name)
            assert executor.submit(sum, [1]).result(timeout=60) == 1
            raise interruption()
    assert wait_nothing_left(emulator, agent, run_names[0]) == []


def _run_script(tmp_path, script, options, environment=None):
    path = tmp_path / "run.py"
    path.write_text(textwrap.dedent(script))
    environment = {**os.environ, **DUMMY_CREDENTIALS, **(environment or {})}
    return subprocess.Popen([sys.executable, str(path), json.dumps(options)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
                            text=True)


def _json_options(options):
    return {key: value for key, value in options.items() if key != "boto3_session"}


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM],
                         ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_in_another_process_leaves_nothing(private, emulator, agent, tmp_path,
                                                            signal_number):
    """A real SIGINT (Ctrl-C) or SIGTERM to a process inside ``with ECSExecutor(...)``."""
    script = """
        import json, sys, time
        from futures_hpc.backends.ecs import ECSExecutor
        with ECSExecutor(max_workers=1, **json.loads(sys.argv[1])) as ex:
            assert ex.submit(sum, [1, 2]).result(timeout=60) == 3
            print("RUN", ex.cluster.run_name, flush=True)
            time.sleep(600)
    """
    process = _run_script(tmp_path, script, _json_options(private(log_group=True,
                                                                  execution_role_arn=EXECUTION_ROLE)))
    line = process.stdout.readline()
    while line and not line.startswith("RUN "):
        line = process.stdout.readline()
    assert line.startswith("RUN "), process.stdout.read()
    run_name = line.split()[1]
    assert leftovers(emulator, agent, run_name) != []
    process.send_signal(signal_number)
    process.wait(60)
    assert wait_nothing_left(emulator, agent, run_name) == []


# -- a result store on S3 ------------------------------------------------------------------------


@pytest.fixture
def s3_store(emulator, monkeypatch):
    """A bucket of the emulator's S3 and the environment that reaches it: ``(bucket, env)``.

    No file holds the endpoint or the dummy keys: this process (the client's s3fs, through
    botocore) gets them as environment variables for this test only, the workers through the
    executor's ``env=`` (the emulated agent passes on none of this process's ``AWS_``
    variables, as a real container would not).
    """
    require(importlib.util.find_spec("s3fs") is not None,
            "a store on S3 needs s3fs (pip install 'futures_hpc[s3]')")
    bucket = f"fhpc-store-{uuid.uuid4().hex[:8]}"
    emulator.client("s3").create_bucket(Bucket=bucket)
    environment = {"AWS_ENDPOINT_URL_S3": emulator.endpoint_url,
                   "AWS_DEFAULT_REGION": REGION, **DUMMY_CREDENTIALS}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return bucket, environment


def _store_objects(emulator, bucket, prefix):
    s3 = emulator.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return [item["Key"][len(prefix) + 1:] for page in pages for item in page.get("Contents", [])]


def test_store_on_s3_records_each_call_and_a_rerun_runs_none(fargate, emulator, s3_store,
                                                             tmp_path, capsys):
    bucket, environment = s3_store
    prefix = "runs/squares"
    url = f"s3://{bucket}/{prefix}"
    side_file = tmp_path / "ran.txt"   # the workers are processes of this machine
    calls, chunksize = 60, 10
    expected = [number * number for number in range(calls)]

    def square(number):
        with open(side_file, "a") as file:
            file.write(f"{number} {os.getpid()}\n")
        return number * number

    with HPCExecutor("ecs", max_workers=2, store=url, **fargate(env=environment)) as ex:
        assert list(ex.map(square, range(calls), chunksize=chunksize)) == expected
        assert ex.store.hits == 0
    ran = side_file.read_text().splitlines()
    assert sorted(int(line.split()[0]) for line in ran) == list(range(calls))
    assert os.getpid() not in {int(line.split()[1]) for line in ran}

    objects = _store_objects(emulator, bucket, prefix)
    worker_objects = [name for name in objects if name.startswith("segments/w-")]
    client_objects = [name for name in objects if name.startswith("segments/r-")]
    assert "FUTURES_HPC_STORE" in objects
    assert len(objects) == 1 + len(worker_objects) + len(client_objects)
    # One object per flush: at most one per chunk on the workers; the client's run record and
    # its function's name.
    assert 1 <= len(worker_objects) <= calls // chunksize
    assert len(client_objects) <= 2

    with HPCExecutor("ecs", max_workers=1, store=url, **fargate(env=environment)) as ex:
        assert list(ex.map(square, range(calls), chunksize=chunksize)) == expected
        assert ex.store.hits == calls
    assert side_file.read_text().splitlines() == ran, "no call ran again"
    again = _store_objects(emulator, bucket, prefix)
    assert set(again) - set(objects) == {name for name in again if name.startswith(
        "segments/r-")} - set(client_objects), "only the second run's record is new"
    assert len(again) == len(objects) + 1

    capsys.readouterr()
    assert cli_main(["store", url]) == 0
    shown = capsys.readouterr().out
    assert f"store {url}: {len(again) - 1} segment files" in shown
    assert f"2 runs, {calls} calls recorded" in shown
    assert cli_main(["store", url, "--clear"]) == 0
    assert _store_objects(emulator, bucket, prefix) == []


@pytest.mark.parametrize("store", ["results", "file:///tmp/fhpc-results"])
def test_store_on_ecs_must_be_a_url(store, fargate, emulator, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = fargate()
    options["boto3_session"], marker = marked_session(options["region"])
    emulator.reset_recording()
    with pytest.raises(OptionError) as caught:
        HPCExecutor("ecs", max_workers=1, store=store, **options)
    message = str(caught.value)
    assert f"store={store!r} is not allowed on the 'ecs' backend" in message
    assert "s3://bucket/prefix" in message
    assert our_requests(emulator, marker) == []
    assert list(tmp_path.iterdir()) == [], "no store was made"


# -- failed workers ------------------------------------------------------------------------------


def test_failed_worker_is_reported_with_its_exit_code_and_replaced(fargate, tmp_path, caplog):
    marker = tmp_path / "crashed-once"
    crash_once = (f"if mkdir {marker} 2>/dev/null; then echo 'simulated crash' >&2; "
                  "exit 3; fi")
    options = fargate(prologue=[crash_once], log_group=True, execution_role_arn=EXECUTION_ROLE)
    with caplog.at_level("WARNING", logger="futures_hpc"):
        with ECSExecutor(max_workers=1, **options) as executor:
            assert executor.submit(sum, [20, 22]).result(timeout=90) == 42
            [failure] = executor.cluster.failures
            assert executor.cluster.job_failure is None
    assert marker.is_dir()
    assert failure.exit_code == 3
    assert failure.stop_code == "EssentialContainerExited"
    assert failure.stopped_reason == "Essential container in task exited"
    assert "simulated crash" in failure.log_tail
    assert "exit code 3" in caplog.text and failure.task_arn in caplog.text


def test_too_many_failures_raise_job_failed_error(fargate, emulator):
    options = fargate(prologue=["echo 'cannot start' >&2; exit 5"], max_resubmissions=1,
                      log_group=True, execution_role_arn=EXECUTION_ROLE)
    with ECSExecutor(max_workers=1, **options) as executor:
        future = executor.submit(sum, [1, 2])
        with pytest.raises(JobFailedError) as caught:
            future.result(timeout=90)
        with pytest.raises(JobFailedError):
            executor.cluster.scale(1)
        log_group = LOG_GROUP_PREFIX + executor.cluster.run_name
    message = str(caught.value)
    assert "2 worker tasks stopped with errors" in message
    assert "max_resubmissions=1" in message
    assert message.count("exit code 5") == 2 and "cannot start" in message
    assert [failure.exit_code for failure in caught.value.failures] == [5, 5]
    logs = emulator.client("logs")
    kept = logs.describe_log_groups(logGroupNamePrefix=log_group)["logGroups"]
    assert [group["logGroupName"] for group in kept] == [log_group], "logs kept for debugging"
    logs.delete_log_group(logGroupName=log_group)


# -- clear errors before any AWS call --------------------------------------------------------------


def _missing_region(fargate, monkeypatch, tmp_path):
    for variable in ("AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    return fargate(region=None)


BAD_OPTIONS = {
    "region": (_missing_region, "region=None"),
    "image": (lambda fargate, *_: fargate(container_image=None), "container_image=None"),
    "subnet": (lambda fargate, *_: fargate(subnet=None), "subnet=None"),
    "execution role for ECR": (lambda fargate, *_: fargate(container_image=ECR_IMAGE),
                               "execution_role_arn=None"),
    "execution role for logs": (lambda fargate, *_: fargate(log_group=True),
                                "execution_role_arn=None"),
    "task role": (lambda fargate, *_: fargate(task_role_arn="worker-role"),
                  "task_role_arn='worker-role'"),
    "fargate cpu/memory pair": (lambda fargate, *_: fargate(cpu=256, memory="4GB"),
                                "memory=4096 (MiB) is not valid with cpu=256"),
    "fargate cpu": (lambda fargate, *_: fargate(cpu=300), "cpu=300"),
    "environment too large": (lambda fargate, *_: fargate(env={"BIG": "x" * 8000}),
                              f"ECS allows {OVERRIDES_LIMIT}"),
}


@pytest.mark.parametrize("case", sorted(BAD_OPTIONS))
@pytest.mark.parametrize("entry", ["cluster", "executor"])
def test_bad_options_fail_before_any_aws_call(case, entry, fargate, emulator, monkeypatch,
                                              tmp_path):
    make_options, expected = BAD_OPTIONS[case]
    options = make_options(fargate, monkeypatch, tmp_path)
    options["boto3_session"], marker = marked_session(options["region"])
    emulator.reset_recording()
    with pytest.raises(OptionError) as caught:
        if entry == "cluster":
            ECSCluster(n_workers=1, **options)
        else:
            HPCExecutor("ecs", max_workers=1, **options)
    assert isinstance(caught.value, ValueError)
    assert expected in str(caught.value)
    assert our_requests(emulator, marker) == []


def test_private_cluster_options_fail_before_any_aws_call(private, emulator):
    session, marker = marked_session()
    emulator.reset_recording()
    for option, value in [("instance_profile_arn", None), ("ami", None), ("num_instances", 0),
                          ("instance_type", None)]:
        with pytest.raises(OptionError, match=f"{option}={value!r}"):
            ECSCluster(**private(boto3_session=session, **{option: value}))
    with pytest.raises(OptionError, match="fargate_spot=True"):
        ECSCluster(**private(boto3_session=session, fargate_spot=True))
    assert our_requests(emulator, marker) == []
    ECSCluster.cleanup_stale(REGION, endpoint_url=emulator.endpoint_url, boto3_session=session)
    assert our_requests(emulator, marker) != [], "the request log does see futures_hpc's calls"


# -- AWS errors named ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iam_enforcing_emulator(tmp_path_factory):
    """A second emulator that enforces IAM, and credentials of a user denied ecs:RunTask."""
    server = MotoServer(tmp_path_factory.mktemp("moto-iam"),
                        {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}).start()
    iam = server.client("iam")
    iam.create_user(UserName="no-run-task")
    key = iam.create_access_key(UserName="no-run-task")["AccessKey"]
    iam.put_user_policy(UserName="no-run-task", PolicyName="all-but-run-task",
                        PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
                            {"Effect": "Allow", "Action": "*", "Resource": "*"},
                            {"Effect": "Deny", "Action": "ecs:RunTask", "Resource": "*"}]}))
    session = boto3.Session(aws_access_key_id=key["AccessKeyId"],
                            aws_secret_access_key=key["SecretAccessKey"], region_name=REGION)
    yield server, session
    server.stop()


def test_access_denied_names_the_operation_and_cleans_up(iam_enforcing_emulator, fargate):
    server, session = iam_enforcing_emulator
    ec2 = session.client("ec2", endpoint_url=server.endpoint_url)
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    with pytest.raises(AWSRequestError) as caught:
        ECSExecutor(max_workers=1, **fargate(endpoint_url=server.endpoint_url,
                                             boto3_session=session, subnet=subnet,
                                             security_groups=[]))
    error = caught.value
    assert (error.operation, error.code) == ("RunTask", "AccessDeniedException")
    assert error.is_access_denied
    assert "AWS ECS RunTask failed in us-east-1" in str(error)
    assert "needs permission ecs:RunTask" in str(error)
    ecs = session.client("ecs", endpoint_url=server.endpoint_url)
    clusters = ecs.describe_clusters(clusters=ecs.list_clusters()["clusterArns"])["clusters"]
    assert clusters and {cluster["status"] for cluster in clusters} == {"INACTIVE"}
    assert ecs.list_task_definitions(status="ACTIVE")["taskDefinitionArns"] == []


class _ThrottlingEndpoint(http.server.BaseHTTPRequestHandler):
    """Answers every AWS JSON request as AWS does when it throttles."""

    def do_POST(self):  # noqa: N802 - the name http.server calls
        self.server.targets.append(self.headers.get("X-Amz-Target"))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_throttling_is_retried_then_names_the_operation(fargate):
    """AWS cannot be made to throttle on demand: a local HTTP endpoint answers every call with
    AWS's ThrottlingException. botocore itself (standard retry mode) is not replaced."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ThrottlingEndpoint)
    server.targets = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(AWSRequestError) as caught:
            ECSCluster(**fargate(endpoint_url=f"http://127.0.0.1:{server.server_port}",
                                 aws_max_attempts=3, clean_stale_on_start=False))
    finally:
        server.shutdown()
    error = caught.value
    assert error.is_throttling and error.operation == "CreateCluster"
    assert server.targets == ["AmazonEC2ContainerServiceV20141113.CreateCluster"] * 3
    assert "after 3 attempts of botocore's standard retry mode" in str(error)


# -- tags and stale resources ---------------------------------------------------------------------


def test_tags_on_everything_created(private, emulator, agent):
    options = private(tags={"project": "tags-test"}, log_group=True,
                      execution_role_arn=EXECUTION_ROLE)
    with ECSCluster(n_workers=1, **options) as cluster:
        resources = cluster.created_resources
        agent.wait_for(lambda: run_tasks_of(emulator, resources.cluster_arn), timeout=30)
        ecs, ec2, logs = (emulator.client(name) for name in ("ecs", "ec2", "logs"))
        tag_sets = {
            "cluster": ecs.describe_clusters(clusters=[resources.cluster_arn],
                                             include=["TAGS"])["clusters"][0]["tags"],
            "task definition": ecs.describe_task_definition(
                taskDefinition=resources.task_definition_arns[0], include=["TAGS"])["tags"],
            "task": run_tasks_of(emulator, resources.cluster_arn)[0]["tags"],
            "instance": ec2.describe_instances(InstanceIds=resources.instance_ids)[
                "Reservations"][0]["Instances"][0]["Tags"],
            "log group": [{"key": key, "value": value} for key, value in logs.list_tags_log_group(
                logGroupName=resources.log_group)["tags"].items()],
        }
        run_name = cluster.run_name
    for resource, tags in tag_sets.items():
        tags = _tags(tags)
        assert tags.get("project") == "tags-test", resource
        assert tags.get(TAG_RUN) == run_name, resource
        assert tags.get("futures_hpc:pid") == str(os.getpid()), resource


def test_cleanup_stale_removes_what_a_crashed_run_left(private, fargate, emulator, agent,
                                                       aws_session, tmp_path):
    script = """
        import json, sys, time
        from distributed import Client
        from futures_hpc.backends.ecs import ECSCluster
        cluster = ECSCluster(n_workers=1, **json.loads(sys.argv[1]))
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
            print("RUN", cluster.run_name, flush=True)
            time.sleep(600)
    """
    options = _json_options(private(log_group=True, execution_role_arn=EXECUTION_ROLE))
    process = _run_script(tmp_path, script, options)
    line = process.stdout.readline()
    while line and not line.startswith("RUN "):
        line = process.stdout.readline()
    assert line.startswith("RUN "), process.stdout.read()
    stale_run = line.split()[1]
    left = leftovers(emulator, agent, stale_run)  # listed first: its task ends soon after
    process.kill()   # a crash: no cleanup runs
    process.wait(30)
    assert any(item.startswith("task ") for item in left)
    assert any(item.startswith("instance ") for item in left)
    assert any(item.startswith("log group ") for item in left)
    with ECSCluster(**fargate(clean_stale_on_start=False)) as live_cluster:
        # The crashed run's worker ends on its own meanwhile, 2 to 3 s after its scheduler
        # (distributed closes a worker whose stream to the scheduler breaks, whatever its
        # death timeout), and its task then stops: only the AWS resources that a cleanup
        # removes, and that nothing else does, are compared.
        assert resources_only(aws_leftovers(emulator, agent, stale_run)) == resources_only(
            left), "only a start that cleans does"
        assert glob.glob(f"{tempfile.gettempdir()}/{stale_run}-tls-*"), "its TLS files too"
        with ECSCluster(**fargate()):   # clean_stale_on_start=True is the default
            assert wait_nothing_left(emulator, agent, stale_run) == []
            assert leftovers(emulator, agent, live_cluster.run_name) != [], "live runs stay"
    assert glob.glob(f"{tempfile.gettempdir()}/{stale_run}-tls-*") == []


def test_cleanup_stale_by_run_name_lists_what_it_removed(private, emulator, agent, aws_session):
    """Naming a run makes it stale whatever its state: here a live one stands in for a run
    whose process is gone (which the previous test shows is found on its own)."""
    with ECSCluster(n_workers=1, **private(log_group=True,
                                           execution_role_arn=EXECUTION_ROLE)) as cluster:
        agent.wait_for(lambda: agent.live_processes() and run_tasks_of(
            emulator, cluster.created_resources.cluster_arn), timeout=30)
        removed = ECSCluster.cleanup_stale(REGION, run_name=cluster.run_name,
                                           endpoint_url=emulator.endpoint_url,
                                           boto3_session=aws_session)
        assert wait_nothing_left(emulator, agent, cluster.run_name) == []
    kinds = {item.split(" arn:")[0].split(" i-")[0].split(" /")[0] for item in removed}
    assert kinds == {"ECS task", "EC2 instance", "ECS cluster", "ECS task definition",
                     "CloudWatch log group", "TLS directory"}


def test_staleness_rules():
    now = datetime.datetime.now(datetime.timezone.utc)
    recent, old = (f"{(now - age):%Y-%m-%dT%H:%M:%SZ}" for age in
                   (datetime.timedelta(minutes=5), datetime.timedelta(days=2)))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    here, alive = socket.gethostname(), os.getpid()

    def tags(host=here, pid=alive, created=recent):
        return {TAG_RUN: "futures-hpc-x", TAG_HOST: host, TAG_PID: str(pid),
                TAG_CREATED: created}

    day = datetime.timedelta(days=1)
    assert not _is_stale(tags(), None, None), "this process's run is alive"
    assert _is_stale(tags(pid=gone.pid), None, None), "its process is gone"
    assert not _is_stale(tags(host="elsewhere", pid=gone.pid), None, None)
    assert not _is_stale(tags(host="elsewhere", pid=gone.pid), None, day)
    assert _is_stale(tags(host="elsewhere", created=old), None, day)
    assert _is_stale(tags(), "futures-hpc-x", None), "a named run is stale"
    assert not _is_stale(tags(pid=gone.pid), "futures-hpc-y", None)
    assert not _is_stale({"project": "x"}, None, day), "not a futures_hpc resource"


# -- scaling ------------------------------------------------------------------------------------


def test_scaling_down_stops_tasks_without_counting_failures(fargate, emulator, agent):
    with ECSCluster(n_workers=2, **fargate()) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        first_tasks = set(cluster.created_resources.task_arns)
        cluster.scale(1)
        deadline = time.monotonic() + 30
        while len(client.scheduler_info()["workers"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = agent.wait_for(lambda: [
            task for task in run_tasks_of(emulator, cluster.created_resources.cluster_arn)
            if task["lastStatus"] == "STOPPED"], timeout=30)
        time.sleep(1.0)   # a few polls of the cluster's watcher
        assert len(stopped) == 1 and stopped[0]["taskArn"] in first_tasks
        assert cluster.failures == [] and cluster.job_failure is None
        assert len(cluster.workers) == 1
        assert client.submit(sum, [1, 2]).result(timeout=30) == 3


def test_adaptive_executor_starts_tasks_on_demand(fargate, emulator):
    with ECSExecutor(adaptive=True, max_workers=2, **fargate()) as executor:
        cluster_arn = executor.cluster.created_resources.cluster_arn
        assert run_tasks_of(emulator, cluster_arn) == []
        assert executor.submit(sum, [4, 5]).result(timeout=90) == 9
        assert 1 <= len(run_tasks_of(emulator, cluster_arn)) <= 2


def test_adaptive_executor_uses_fair_share_and_releases_idle_tasks(fargate, emulator, agent):
    with ECSExecutor(adaptive=True, max_workers=2, max_pending_jobs=1, idle_timeout=2,
                     **fargate()) as executor:
        assert isinstance(executor.cluster._adaptive, FairShareAdaptive)
        cluster_arn = executor.cluster.created_resources.cluster_arn
        futures = [executor.submit(time.sleep, 0.5) for _ in range(6)]
        most_pending = 0
        while not all(future.done() for future in futures):
            most_pending = max(most_pending, executor.status().jobs_pending)
            time.sleep(0.05)
        assert [future.result() for future in futures] == [None] * 6
        assert most_pending <= 1
        status = executor.status()
        assert status.adaptive and status.workers >= 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                executor.status().workers or any(task["lastStatus"] != "STOPPED"
                                                 for task in run_tasks_of(emulator, cluster_arn))):
            time.sleep(0.5)
        assert executor.status().workers == 0
        assert all(task["lastStatus"] == "STOPPED" for task in run_tasks_of(emulator, cluster_arn))
        assert executor.status().retired_jobs >= 1
        assert executor.cluster.failures == []  # released, not failed
        assert executor.submit(sum, [1, 2]).result(timeout=90) == 3  # scales up again


@pytest.mark.parametrize(("option", "value"), [
    ("adaptive", "yes"), ("idle_timeout", -1), ("max_pending_jobs", 0), ("min_workers", 3)])
def test_bad_scaling_options_fail_before_any_aws_call(option, value, fargate, emulator):
    options = fargate()
    options["boto3_session"], marker = marked_session(options["region"])
    emulator.reset_recording()
    with pytest.raises(OptionError, match=f"{option}"):
        ECSExecutor(max_workers=2, **{**options, "adaptive": True, option: value})
    assert our_requests(emulator, marker) == []


# -- pools (ex.with_resources) ------------------------------------------------------------------


def _worker_of_call(value):
    worker = distributed.get_worker()
    return (value, str(worker.name), worker.state.nthreads,
            dict(worker.state.total_resources), os.environ.get("OMP_NUM_THREADS"))


def test_a_pool_runs_its_calls_on_tasks_of_its_own_size(fargate, emulator, agent):
    """``with_resources(cores=2, memory="4GB")`` on Fargate: tasks of 2048 CPU units, 4096 MiB.

    The pool's worker task uses a task definition of its own (read back from the emulator),
    the executor's own calls stay on its own task, an idle pool task is stopped, and nothing is
    left once the executor exits.
    """
    with ECSExecutor(max_workers=1, idle_timeout=2, **fargate()) as executor:
        task_run_name = executor.cluster.run_name
        cluster_arn = executor.cluster.created_resources.cluster_arn
        big = executor.with_resources(cores=2, memory="4GB", max_workers=1)
        own = [executor.submit(_worker_of_call, number) for number in range(4)]
        pooled = list(big.map(_worker_of_call, range(4)))
        assert [result[0] for result in pooled] == [0, 1, 2, 3]
        assert {result[1] for result in pooled} == {f"{task_run_name}-p1-0"}
        assert {(result[2], result[4]) for result in pooled} == {(2, "2")}
        assert all(result[3] == {"fhpc-pool-1": 1} for result in pooled)
        assert all("fhpc-pool-0" in future.result()[3] for future in own)
        ecs = emulator.client("ecs")
        tasks = run_tasks_of(emulator, cluster_arn)
        pool_tasks = [task for task in tasks
                      if _tags(task.get("tags")).get("futures_hpc:worker")
                      == f"{task_run_name}-p1-0"]
        assert pool_tasks, [task["taskDefinitionArn"] for task in tasks]
        definition = ecs.describe_task_definition(
            taskDefinition=pool_tasks[0]["taskDefinitionArn"])["taskDefinition"]
        assert (definition["cpu"], definition["memory"]) == ("2048", "4096")
        base_definition = ecs.describe_task_definition(
            taskDefinition=executor.cluster._run.task_definition_arn)["taskDefinition"]
        assert (base_definition["cpu"], base_definition["memory"]) == ("256", "512")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and executor.status().pools["pool-1"]["jobs_running"]:
            time.sleep(0.5)
        assert executor.status().pools["pool-1"]["retired_jobs"] == 1
        assert executor.cluster.failures == []  # released, not failed
        assert big.submit(_worker_of_call, 9).result(timeout=90)[0] == 9  # back on demand
        assert leftovers(emulator, agent, task_run_name) != []  # the check can see them
    assert wait_nothing_left(emulator, agent, task_run_name) == []


def test_a_pool_whose_tasks_keep_failing_fails_alone(fargate, emulator, agent):
    """The prologue fails in the pool's tasks only (they alone have ``OMP_NUM_THREADS=2``).

    They count against ``max_resubmissions`` for the pool alone: its first task is replaced, the
    second is one too many, so the pool's calls fail with :class:`JobFailedError` naming the
    pool and both exit codes, and the executor's own calls go on with no failure counted.
    """
    only_the_pool_fails = ('if [ "${OMP_NUM_THREADS:-}" = 2 ]; then '
                           "echo 'pool task cannot start' >&2; exit 7; fi")
    options = fargate(prologue=[only_the_pool_fails], max_resubmissions=1, log_group=True,
                      execution_role_arn=EXECUTION_ROLE)
    with ECSExecutor(max_workers=1, **options) as executor:
        task_run_name = executor.cluster.run_name
        assert executor.submit(sum, [1, 2]).result(timeout=90) == 3
        big = executor.with_resources(cores=2, memory="4GB", max_workers=1)
        with pytest.raises(JobFailedError) as caught:
            big.submit(sum, [3, 4]).result(timeout=180)
        message = str(caught.value)
        assert big.pool_name in message and "max_resubmissions=1" in message, message
        assert message.count("exit code 7") == 2 and "pool task cannot start" in message
        with pytest.raises(JobFailedError, match=big.pool_name):
            big.submit(sum, [1, 2])
        assert executor.submit(sum, [5, 6]).result(timeout=90) == 11
        assert executor.cluster.failures == [] and executor.cluster.job_failure is None
        assert executor.status().resubmissions == 0
        assert executor.status().pools[big.pool_name]["resubmissions"] == 2
    log_group = LOG_GROUP_PREFIX + task_run_name
    # The failed tasks' logs are kept for debugging, and only they.
    assert wait_nothing_left(emulator, agent, task_run_name) == [f"log group {log_group}"]
    emulator.client("logs").delete_log_group(logGroupName=log_group)
    assert wait_nothing_left(emulator, agent, task_run_name) == []


def test_pool_sizes_fargate_does_not_offer_are_refused_before_any_task(fargate, emulator):
    with ECSExecutor(max_workers=1, **fargate()) as executor:
        with pytest.raises(OptionError, match="cores=3"):
            executor.with_resources(cores=3)
        with pytest.raises(OptionError, match="gpus=1.*Fargate"):
            executor.with_resources(gpus=1)
        with pytest.raises(OptionError, match="memory"):
            executor.with_resources(cores=1, memory="64GB")
        assert executor.status().pools == {}


def test_a_gpu_pool_asks_ecs_for_gpus_and_only_its_calls_go_there(private, emulator, agent):
    """``gpus=1`` on EC2: the pool's task definition has a GPU ``resourceRequirements``.

    There is no GPU here (and the emulator does not book GPUs): the test reads the request
    back from ECS and checks the placement through the worker's ``GPU`` dask resource.
    """
    with ECSExecutor(max_workers=1, idle_timeout=30, **private()) as executor:
        gpu = executor.with_resources(gpus=1, memory="1GB", max_workers=1)
        value, name, _, resources, _ = gpu.submit(_worker_of_call, 7).result(timeout=120)
        assert value == 7 and resources == {"fhpc-pool-1": 1, "GPU": 1}
        own = [executor.submit(_worker_of_call, number).result(timeout=60)
               for number in range(3)]
        assert all(result[1] != name and "GPU" not in result[3] for result in own)
        shape = executor.cluster.pool_shapes()["p1"]
        definition = emulator.client("ecs").describe_task_definition(
            taskDefinition=shape.task_definition_arn)["taskDefinition"]
        container = definition["containerDefinitions"][0]
        assert container["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
        assert container["memory"] == 1024
