"""How the batch executors read why a job waits: which reasons can never clear.

The real schedulers' behaviour is tested in test_slurm.py, test_sge.py and test_pbs.py (the
shared batch suite in batch_helpers.py); these tests pin the tables and parsers beside them.
"""

from __future__ import annotations

import pytest

from futures_hpc.backends.batch.pbs import parse_qstat_full, pbs_comment_never_clears
from futures_hpc.backends.batch.slurm import slurm_reason_never_clears

#: Reasons squeue(1) and job_reason_codes.html describe as limits of the request itself, or
#: invalid or refused settings, or a dependency that failed: waiting cannot clear them.
NEVER_CLEAR = [
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "MaxMemPerLimit",
    "BadConstraints", "InvalidAccount", "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed",
    "DependencyNeverSatisfied", "ReservationInvalid", "ReservationDeleted",
    "QOSMaxCpuPerJobLimit", "QOSMaxWallDurationPerJobLimit", "QOSMaxNodePerJobLimit",
    "QOSMaxMemoryPerJob", "QOSMaxGRESPerNode", "QOSMaxCpuPerNode", "QOSMaxCpuMinutesPerJobLimit",
    "AssocMaxCpuPerJobLimit", "AssocMaxWallDurationPerJobLimit", "AssocMaxNodePerJobLimit",
    "AssocMaxMemPerNode", "AssocMaxGRESPerJob", "QOSMinCpuNotSatisfied", "QOSMinMemory",
    "QOSMinGRES",
]

#: Reasons that clear as the queue moves, other jobs end, a time comes or someone acts.
CLEAR_IN_TIME = [
    None, "", "None", "Priority", "Resources", "BeginTime", "Dependency", "Prolog",
    "WaitingForScheduling", "Cleaning", "Reservation", "JobHeldUser", "JobHeldAdmin",
    "Licenses", "NodeDown", "PartitionDown", "PartitionInactive", "FrontEndDown",
    "ReqNodeNotAvail, UnavailableNodes:node[1-4]", "AssocMaxJobsLimit", "AssocGrpCpuLimit",
    "AssocGrpJobsLimit", "QOSMaxJobsPerUserLimit", "QOSMaxSubmitJobPerUserLimit",
    "QOSMaxCpuPerUserLimit", "QOSMaxNodePerUserLimit", "QOSGrpCpuLimit", "QOSGrpNodeLimit",
    "MaxCpuPerAccount", "MaxJobsPerAccount", "AssocMaxSubmitJobLimit", "QOSJobLimit",
    "QOSResourceLimit", "AccountingPolicy", "SomeReasonOfAFutureSlurm",
]


@pytest.mark.parametrize("reason", NEVER_CLEAR)
def test_slurm_reasons_that_never_clear(reason):
    assert slurm_reason_never_clears(reason)
    assert slurm_reason_never_clears(f"{reason}, with details")


@pytest.mark.parametrize("reason", CLEAR_IN_TIME)
def test_slurm_reasons_that_clear_in_time_keep_waiting(reason):
    assert not slurm_reason_never_clears(reason)


def test_pbs_can_never_run_comment():
    assert pbs_comment_never_clears(
        "Can Never Run: Insufficient amount of resource: ncpus (R: 64 A: 2 T: 2)")
    assert not pbs_comment_never_clears("Not Running: Insufficient amount of resource: ncpus")
    assert not pbs_comment_never_clears(None)
    assert not pbs_comment_never_clears("")


def test_qstat_full_output_is_read_with_wrapped_values():
    """PBS Pro indents attributes by four spaces and wraps long values with a tab."""
    text = (
        "Job Id: 1234.pbs-server\n"
        "    Job_Name = fhpc-1a2b3c4d\n"
        "    job_state = Q\n"
        "    comment = Can Never Run: Insufficient amount of resource: ncpus (R: 64 A: 2 T\n"
        "\t: 2)\n"
        "    Resource_List.ncpus = 64\n"
        "\n"
        "Job Id:\t1235\n"
        "\tJob_Name = fhpc-1a2b3c4d\n"
        "\tjob_state = R\n"
    )
    jobs = parse_qstat_full(text)
    assert set(jobs) == {"1234", "1235"}
    assert jobs["1234"]["job_state"] == "Q"
    assert jobs["1234"]["comment"] == (
        "Can Never Run: Insufficient amount of resource: ncpus (R: 64 A: 2 T: 2)")
    assert jobs["1234"]["Resource_List.ncpus"] == "64"
    assert jobs["1235"] == {"Job_Name": "fhpc-1a2b3c4d", "job_state": "R"}
