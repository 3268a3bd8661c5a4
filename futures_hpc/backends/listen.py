"""Where the scheduler and the batch workers listen: the interface the workers use, no other.

dask-jobqueue's defaults make the scheduler, every worker and every nanny listen on all
interfaces (``0.0.0.0`` and ``[::]``), and each worker's HTTP server on ``0.0.0.0`` without TLS.
The batch backends narrow this down:

- the scheduler listens on the address the workers reach it by: the address this host's name
  resolves to, or, when that is a loopback address (which compute nodes could not reach), the
  address of the interface that routes outwards (the one dask advertises by default);
- each worker and nanny listens on the address of its node's interface that routes to the
  scheduler, found when the job starts by a line of the job script;
- each worker's HTTP server listens on that address too, and with TLS it serves nothing (its
  dashboard is off and it has no routes): distributed always starts it, but it has no TLS;
- the scheduler's dashboard stays where ``dashboard_address`` says (localhost by default).

A user's ``interface``, ``scheduler_options={"host"/"interface": ...}`` or worker
``--host``/``--listen-address``/``--interface``/``--dashboard-address`` arguments win.
"""

from __future__ import annotations

import ipaddress
import shlex
import socket
from dataclasses import dataclass, field
from typing import Any

from distributed.utils import get_ip, get_ip_interface

#: Shell variables the job script sets before the worker starts.
WORKER_HOST_VARIABLE = "FUTURES_HPC_WORKER_HOST"
WORKER_HTTP_VARIABLE = "FUTURES_HPC_WORKER_HTTP"

#: Worker arguments that say where the worker listens; given by the user, ours are left out.
_WORKER_LISTEN_ARGUMENTS = ("--host", "--listen-address", "--interface")

# Run by the job's Python: print the address of the node's interface that routes to the
# scheduler (or of a named interface). Stdlib only, unless an interface is named.
_WORKER_ADDRESS_PROGRAM = """import socket, sys
target = sys.argv[1]
if target.startswith("interface:"):
    from distributed.utils import get_ip_interface
    print(get_ip_interface(target[len("interface:"):]))
else:
    family, _, _, _, address = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        print(probe.getsockname()[0])
"""


@dataclass
class ListenPlan:
    """What the batch cluster needs to listen narrowly.

    Attributes
    ----------
    scheduler_options : dict
        To merge into dask-jobqueue's ``scheduler_options`` (a ``host``, or nothing).
    worker_arguments : list of str
        To append to the worker command (``--host``, ``--dashboard-address``, ...).
    prologue : list of str
        Job script lines that find the worker's address, before the worker starts.

    """

    scheduler_options: dict[str, Any] = field(default_factory=dict)
    worker_arguments: list[str] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)


def scheduler_host_for_workers() -> str:
    """The address batch workers reach this machine by.

    The address this host's name resolves to, unless it is a loopback address (compute nodes
    could not reach it); then the address of the interface that routes outwards.
    """
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return get_ip()
    if ipaddress.ip_address(address).is_loopback:
        return get_ip()
    return address


def _given(arguments: list[str], names: tuple[str, ...]) -> bool:
    """Whether any of the options ``names`` is among the worker arguments (in any spelling)."""
    tokens = [token for argument in arguments for token in str(argument).split()]
    return any(token.split("=", 1)[0] in names for token in tokens)


def plan_batch_listening(
    scheduler_options: dict[str, Any],
    interface: str | None,
    worker_arguments: list[str],
    python: str,
    tls: bool,
) -> ListenPlan:
    """Decide where a batch cluster's scheduler and workers listen.

    Parameters
    ----------
    scheduler_options : dict
        The user's ``scheduler_options`` (a ``host`` or ``interface`` there wins).
    interface : str or None
        The user's ``interface`` (dask-jobqueue gives it to the scheduler and the workers).
    worker_arguments : list of str
        The user's extra worker arguments (their listen and dashboard arguments win).
    python : str
        The job's Python interpreter.
    tls : bool
        Whether TLS is on: the workers' HTTP servers then serve nothing.

    Returns
    -------
    ListenPlan

    """
    plan = ListenPlan()
    if "host" in scheduler_options:
        scheduler_host = str(scheduler_options["host"])
    elif scheduler_options.get("interface") or interface:
        scheduler_host = get_ip_interface(scheduler_options.get("interface") or interface)
    else:
        scheduler_host = scheduler_host_for_workers()
        plan.scheduler_options["host"] = scheduler_host
    target = f"interface:{interface}" if interface else scheduler_host
    find_address = (
        f"{WORKER_HOST_VARIABLE}=$({shlex.quote(python)} -c {shlex.quote(_WORKER_ADDRESS_PROGRAM)}"
        f" {shlex.quote(target)}) || printf 'futures_hpc: no address of %s found on %s; the "
        f"worker listens on every interface\\n' {shlex.quote(target)} \"$(hostname)\" >&2"
    )
    http_address = (
        f'case "${WORKER_HOST_VARIABLE}" in *:*) {WORKER_HTTP_VARIABLE}="[${WORKER_HOST_VARIABLE}]'
        f':0" ;; *) {WORKER_HTTP_VARIABLE}="${WORKER_HOST_VARIABLE}:0" ;; esac'
    )
    plan.prologue = [find_address, http_address]
    if not interface and not _given(worker_arguments, _WORKER_LISTEN_ARGUMENTS):
        plan.worker_arguments += ["--host", f'"${WORKER_HOST_VARIABLE}"']
    if not _given(worker_arguments, ("--dashboard-address",)):
        plan.worker_arguments += ["--dashboard-address", f'"${WORKER_HTTP_VARIABLE}"']
    if tls and not _given(worker_arguments, ("--dashboard",)):  # unless asked for, none
        if not _given(worker_arguments, ("--no-dashboard",)):
            plan.worker_arguments.append("--no-dashboard")
        plan.prologue.append("export DASK_DISTRIBUTED__WORKER__HTTP__ROUTES='[]'")
    return plan
