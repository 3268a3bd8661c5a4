"""The client's import path, carried to the workers.

cloudpickle sends a function of an importable module by reference: the worker imports the module
by name. A script's helper module next to it, a package in the working directory or a directory
on ``PYTHONPATH`` are importable in the client but not, by default, in a batch job (Grid Engine
starts jobs with a minimal environment), an MPI rank or a worker started elsewhere. So the
executor passes on the directories of the client's ``sys.path`` that are not the interpreter's
own (its standard library and site-packages) and its working directory:

- :class:`ImportPathPlugin`, a worker plugin, puts them at the front of each worker's
  ``sys.path`` when the worker starts (those that exist there), on every backend;
- batch jobs also get them in ``PYTHONPATH`` (so that programs the calls start see them too),
  and so do ranks the MPI backend launches.

``HPCExecutor(import_path=False)`` turns this off; a list of directories replaces the automatic
choice.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Iterable
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import OptionError

#: The name under which the plugin is registered on a scheduler.
PLUGIN_NAME = "futures_hpc-import-path"


def _interpreter_directories() -> list[str]:
    """The directories that belong to the interpreter: prefixes and site-packages."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    try:
        roots.update(site.getsitepackages())
    except AttributeError:  # some virtualenv versions
        pass
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        roots.add(user_site)
    return [os.path.realpath(root) for root in roots if root]


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def client_import_path() -> list[str]:
    """The working directory and the user's own ``sys.path`` directories, in ``sys.path`` order.

    Entries of the interpreter itself, missing paths and duplicates are left out. The working
    directory comes first when ``sys.path`` has no entry for it (as under ``python script.py``,
    where ``sys.path[0]`` is the script's directory instead).
    """
    roots = _interpreter_directories()
    entries: list[str] = []
    for entry in [os.getcwd(), *sys.path]:
        path = os.path.realpath(entry or os.getcwd())
        if path in entries or not os.path.exists(path) or _inside(path, roots):
            continue
        entries.append(path)
    return entries


def import_path_option(value: Any) -> list[str]:
    """The directories for ``import_path=value``.

    Parameters
    ----------
    value : bool, None or list of str
        True or None: :func:`client_import_path`; False: none; a list: those directories.

    Raises
    ------
    OptionError
        For any other value.

    """
    if value is None or value is True:
        return client_import_path()
    if value is False:
        return []
    if isinstance(value, (list, tuple)) and all(
        isinstance(item, (str, os.PathLike)) and str(item).strip() for item in value
    ):
        return [os.path.abspath(os.path.expanduser(str(item))) for item in value]
    raise OptionError(
        f"import_path={value!r} is not allowed; use True (the client's working directory and "
        "its own sys.path entries, the default), False (none) or a list of directories"
    )


def pythonpath_value(entries: list[str]) -> str:
    """``PYTHONPATH`` for a process started with ``entries`` ahead of what it has already."""
    return os.pathsep.join(entries)


class ImportPathPlugin(WorkerPlugin):
    """Put the client's import directories at the front of each worker's ``sys.path``.

    Parameters
    ----------
    entries : list of str
        Directories, in the client's order; those missing on the worker's host are skipped.

    """

    name = PLUGIN_NAME

    def __init__(self, entries: list[str]) -> None:
        self.entries = list(entries)

    def setup(self, worker: Any = None) -> None:
        """Add the directories to ``sys.path`` (before the worker runs any call)."""
        for entry in reversed(self.entries):
            if entry not in sys.path and os.path.isdir(entry):
                sys.path.insert(0, entry)
