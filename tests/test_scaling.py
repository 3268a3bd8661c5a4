"""The fair-share policy's decisions, as a pure function over small snapshots (no cluster)."""

from __future__ import annotations

import pytest

from futures_hpc.errors import OptionError
from futures_hpc.scaling import (
    ClusterSnapshot,
    JobSnapshot,
    ScalingLimits,
    decide,
    validate_scaling_options,
    walltime_margin,
    wanted_workers,
)

LIMITS = ScalingLimits(min_jobs=0, max_jobs=6, max_pending_jobs=2, idle_timeout=10.0)


def running(name: str, *, busy: int = 0, idle_since: float | None = None, workers: int = 1,
            started_at: float = 0.0, draining: bool = False) -> JobSnapshot:
    return JobSnapshot(name=name, submitted_at=0.0, connected_workers=workers,
                       busy_workers=busy, idle_since=None if busy else idle_since,
                       started_at=started_at, draining=draining)


def pending(name: str, submitted_at: float = 0.0) -> JobSnapshot:
    return JobSnapshot(name=name, submitted_at=submitted_at)


def test_scale_up_never_exceeds_the_pending_job_cap():
    decision = decide(LIMITS, ClusterSnapshot(now=1.0, wanted_workers=6))
    assert decision.submit == 2
    # Two already wait in the queue: nothing more until one starts.
    jobs = (pending("a"), pending("b"))
    assert decide(LIMITS, ClusterSnapshot(now=1.0, wanted_workers=6, jobs=jobs)).submit == 0
    # One started: one more may queue.
    jobs = (running("a", busy=1), pending("b"))
    assert decide(LIMITS, ClusterSnapshot(now=1.0, wanted_workers=6, jobs=jobs)).submit == 1


def test_scale_up_never_exceeds_max_jobs():
    jobs = tuple(running(str(index), busy=1) for index in range(5))
    decision = decide(LIMITS, ClusterSnapshot(now=1.0, wanted_workers=100, jobs=jobs))
    assert decision.submit == 1


def test_multi_process_jobs_are_counted_whole():
    limits = ScalingLimits(min_jobs=0, max_jobs=3, max_pending_jobs=5, idle_timeout=10.0,
                           processes_per_job=4)
    assert decide(limits, ClusterSnapshot(now=0.0, wanted_workers=5)).submit == 2
    # A job with one busy worker of four is not idle: it is never retired in part.
    jobs = (running("a", busy=1, workers=4), running("b", idle_since=0.0, workers=4))
    decision = decide(limits, ClusterSnapshot(now=100.0, wanted_workers=0, jobs=jobs))
    assert decision.retire == ("b",)


def test_idle_jobs_are_released_only_after_idle_timeout():
    jobs = (running("a", idle_since=100.0), running("b", busy=1))
    early = decide(LIMITS, ClusterSnapshot(now=109.0, wanted_workers=1, jobs=jobs))
    assert early.retire == () and early.submit == 0
    late = decide(LIMITS, ClusterSnapshot(now=110.0, wanted_workers=1, jobs=jobs))
    assert late.retire == ("a",)


def test_short_gap_between_bursts_keeps_the_jobs():
    """No work for less than idle_timeout: no job is cancelled, none resubmitted."""
    jobs = tuple(running(str(index), idle_since=50.0) for index in range(4))
    gap = decide(LIMITS, ClusterSnapshot(now=55.0, wanted_workers=0, jobs=jobs))
    assert gap.retire == () and gap.submit == 0
    burst = decide(LIMITS, ClusterSnapshot(now=56.0, wanted_workers=4, jobs=jobs))
    assert burst.retire == () and burst.submit == 0


def test_min_jobs_are_kept_when_idle():
    limits = ScalingLimits(min_jobs=2, max_jobs=6, max_pending_jobs=2, idle_timeout=1.0)
    jobs = tuple(running(str(index), idle_since=0.0) for index in range(3))
    decision = decide(limits, ClusterSnapshot(now=100.0, wanted_workers=0, jobs=jobs))
    assert len(decision.retire) == 1
    assert decide(limits, ClusterSnapshot(now=0.0, wanted_workers=0)).submit == 2


def test_unneeded_pending_jobs_go_first():
    jobs = (running("old", idle_since=0.0), pending("queued", submitted_at=50.0))
    decision = decide(LIMITS, ClusterSnapshot(now=100.0, wanted_workers=1, jobs=jobs))
    assert decision.retire == ("queued",)


def test_walltime_drains_replaces_and_then_retires():
    limits = ScalingLimits(min_jobs=0, max_jobs=1, max_pending_jobs=2, idle_timeout=10.0,
                           walltime=60.0)
    margin = min(walltime_margin(2.0, 5.0), 30.0)
    job = running("a", busy=1, started_at=0.0)
    before = decide(limits, ClusterSnapshot(now=59.0 - margin, wanted_workers=1, jobs=(job,),
                                            longest_call=2.0, startup=5.0))
    assert before.drain == ()
    at = decide(limits, ClusterSnapshot(now=60.0 - margin, wanted_workers=1, jobs=(job,),
                                        longest_call=2.0, startup=5.0))
    # Drained while its call runs (not retired yet), and replaced at once.
    assert at.drain == ("a",) and at.retire == () and at.submit == 1
    idle = running("a", idle_since=55.0, started_at=0.0, draining=True)
    after = decide(limits, ClusterSnapshot(now=56.0, wanted_workers=1,
                                           jobs=(idle, pending("b"))))
    assert after.retire == ("a",) and after.submit == 0


def test_wanted_workers_is_capped_by_runnable_tasks():
    assert wanted_workers(adaptive_target=10, runnable_tasks=0, threads_per_worker=1) == 0
    assert wanted_workers(adaptive_target=10, runnable_tasks=3, threads_per_worker=1) == 3
    assert wanted_workers(adaptive_target=2, runnable_tasks=30, threads_per_worker=1) == 2
    assert wanted_workers(adaptive_target=0, runnable_tasks=1, threads_per_worker=4) == 1


@pytest.mark.parametrize("options, name", [
    ({"adaptive": "yes"}, "adaptive"),
    ({"min_workers": -1}, "min_workers"),
    ({"min_workers": 9}, "min_workers"),
    ({"idle_timeout": 0}, "idle_timeout"),
    ({"idle_timeout": "60"}, "idle_timeout"),
    ({"max_pending_jobs": 0}, "max_pending_jobs"),
    ({"max_resubmissions": -1}, "max_resubmissions"),
    ({"max_resubmissions": 1.5}, "max_resubmissions"),
])
def test_bad_options_are_refused_by_name(options, name):
    with pytest.raises(OptionError, match=rf"^{name}=.* is not allowed; {name} must be"):
        validate_scaling_options(options, max_workers=4)


def test_default_options():
    options = validate_scaling_options({}, max_workers=4)
    assert options.adaptive is True and options.min_workers == 0
    assert options.max_resubmissions == 3 and options.idle_timeout is None  # "auto"
    assert validate_scaling_options({"max_resubmissions": 0}, 4).max_resubmissions == 0
    assert validate_scaling_options({"idle_timeout": "auto"}, 4).idle_timeout is None
    assert validate_scaling_options({"idle_timeout": 30}, 4).idle_timeout == 30.0


def test_the_automatic_idle_timeout_is_the_start_up_within_its_range():
    from futures_hpc.scaling import AUTO_IDLE_TIMEOUT_RANGE, auto_idle_timeout
    from futures_hpc.scaling_policy import DEFAULT_STARTUP_SECONDS

    shortest, longest = AUTO_IDLE_TIMEOUT_RANGE
    assert auto_idle_timeout(None) == DEFAULT_STARTUP_SECONDS  # no job has started yet
    assert auto_idle_timeout(47.5) == 47.5
    assert auto_idle_timeout(0.4) == shortest
    assert auto_idle_timeout(3 * 3600.0) == longest


def test_a_word_other_than_auto_is_refused_for_idle_timeout():
    with pytest.raises(OptionError, match=r"idle_timeout='soon' is not allowed; .*'auto'"):
        validate_scaling_options({"idle_timeout": "soon"}, max_workers=4)


def test_status_of_a_local_executor_counts_its_workers():
    from futures_hpc import HPCExecutor

    with HPCExecutor("local", max_workers=2) as ex:
        assert ex.submit(abs, -3).result(timeout=60) == 3
        status = ex.status()
    assert status.workers == 2
    assert status.adaptive is False and status.resubmissions == 0 and status.lost_calls == 0


def test_call_time_drains_a_job_that_could_not_finish_a_call():
    """A pool's ``call_time`` (300 s) drains a job of 600 s walltime from 300 s left on."""
    limits = ScalingLimits(min_jobs=0, max_jobs=2, max_pending_jobs=2, idle_timeout=10.0,
                           walltime=600.0, call_time=300.0)
    job = running("a", busy=1, started_at=0.0)
    early = decide(limits, ClusterSnapshot(now=299.0, wanted_workers=1, jobs=(job,),
                                           longest_call=1.0, startup=5.0))
    assert early.drain == ()
    late = decide(limits, ClusterSnapshot(now=300.0, wanted_workers=1, jobs=(job,),
                                          longest_call=1.0, startup=5.0))
    assert late.drain == ("a",) and late.submit == 1
    # Without a call time the same job would still take calls (margin of short calls only).
    plain = decide(ScalingLimits(min_jobs=0, max_jobs=2, max_pending_jobs=2,
                                 idle_timeout=10.0, walltime=600.0),
                   ClusterSnapshot(now=300.0, wanted_workers=1, jobs=(job,),
                                   longest_call=1.0, startup=5.0))
    assert plain.drain == ()


def test_a_job_still_in_the_queue_may_have_its_own_idle_timeout():
    """idle_timeout="auto" keeps a queued job without work longer than a started one."""
    limits = ScalingLimits(min_jobs=0, max_jobs=2, max_pending_jobs=2, idle_timeout=3.0,
                           pending_idle_timeout=60.0)
    jobs = (JobSnapshot("queued", submitted_at=0.0),
            JobSnapshot("idle", submitted_at=0.0, connected_workers=1, idle_since=5.0,
                        started_at=2.0))
    early = decide(limits, ClusterSnapshot(now=10.0, wanted_workers=0, jobs=jobs))
    assert early.retire == ("idle",)
    late = decide(limits, ClusterSnapshot(now=61.0, wanted_workers=0, jobs=jobs))
    assert set(late.retire) == {"queued", "idle"}
