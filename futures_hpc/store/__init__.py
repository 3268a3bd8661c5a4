"""Durable results: a run records each call's result; the next run reuses them.

``HPCExecutor(store=PATH)`` records the result of every successful call (of ``submit``, ``map``
and the joblib backend, and every block of ``map_blocks``) in the store at ``PATH``, written by
the worker that ran it. Running the same program again with the same store answers each
recorded call from the store, in the client's call queue, and runs only the others.

- :mod:`~futures_hpc.store.frames`: records, checksums, torn tails;
- :mod:`~futures_hpc.store.segments`: the store's files, one writer each;
- :mod:`~futures_hpc.store.identity`: what makes two calls the same call;
- :mod:`~futures_hpc.store.results`: the client's index of a store;
- :mod:`~futures_hpc.store.recorder`: the workers' side;
- :mod:`~futures_hpc.store.admin`: what ``futures-hpc store`` shows and clears.
"""

from .identity import Occurrences, call_key, function_identity
from .recorder import StoreSpec
from .results import MISSING, ResultStore

__all__ = ["MISSING", "Occurrences", "ResultStore", "StoreSpec", "call_key",
           "function_identity"]
