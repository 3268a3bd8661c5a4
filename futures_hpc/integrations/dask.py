"""dask-ctl's entry point and the dask names of :mod:`futures_hpc.discovery`, re-exported.

``pyproject.toml`` registers :func:`discover` for dask-ctl; the code lives in
:mod:`futures_hpc.discovery`, which the executor uses itself.
"""

from ..discovery import *  # noqa: F403 - this module is futures_hpc.discovery's public names
from ..discovery import __all__  # noqa: F401
