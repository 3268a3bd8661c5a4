"""Integrations with the libraries users come from: joblib (and so scikit-learn) and dask.

``import futures_hpc`` calls :func:`register_integrations`, which registers the joblib parallel
backend ``"futures_hpc"`` when joblib is installed (importing joblib after distributed costs about
10 ms). Dask needs no registration: :class:`~futures_hpc.HPCExecutor` used as a context manager
makes its cluster dask's default scheduler (see :mod:`futures_hpc.integrations.dask`).
"""

from __future__ import annotations

import importlib.util
import logging

logger = logging.getLogger("futures_hpc")


def register_integrations() -> list[str]:
    """Register the integrations whose libraries are installed; return their names.

    Safe to call more than once.
    """
    registered = []
    if importlib.util.find_spec("joblib") is not None:
        try:
            from .joblib import register_joblib_backend

            register_joblib_backend()
            registered.append("joblib")
        except Exception as error:  # an incompatible joblib must not break `import futures_hpc`
            logger.warning("the joblib backend 'futures_hpc' could not be registered: %r", error)
    return registered


__all__ = ["register_integrations"]
