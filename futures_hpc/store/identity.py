"""What makes two calls the same call: the function's code and values, the arguments, the turn.

A call's key is a 16-byte BLAKE2b digest of

- the function's identity: its cloudpickle bytes (for a function pickled by value, its code and
  the values it captures; for one imported by name, its module and name) and, for every
  function reached through it (the function itself, a ``functools.partial``'s function, a bound
  method's function), its compiled code. Editing a function's body therefore makes a new
  function even when it is imported by name. Moving it in its file does too: line numbers are
  part of the code, which errs on the side of running again.
- its arguments, pickled as the call queue sends them;
- which occurrence of that very call it is in this run, so that ``submit(random.random)``
  twice stays two calls, recorded apart.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any


def _normalized(code: types.CodeType) -> types.CodeType:
    """``code`` without its file name and first line: moving a function is not editing it."""
    consts = tuple(_normalized(value) if isinstance(value, types.CodeType) else value
                   for value in code.co_consts)
    return code.replace(co_filename="", co_firstlineno=1, co_consts=consts)


def _code_of(function: Any) -> bytes:
    """The compiled code that ``function`` runs, as bytes (empty for a builtin)."""
    for _ in range(8):
        if isinstance(function, functools.partial):
            function = function.func
            continue
        inner = getattr(function, "__func__", None)  # a bound method
        if inner is not None:
            function = inner
            continue
        code = getattr(function, "__code__", None)
        if code is None and not isinstance(function, type):  # a callable object
            code = getattr(type(function).__call__, "__code__", None)
        return marshal.dumps(_normalized(code)) if isinstance(code, types.CodeType) else b""
    return b""


def function_identity(function: Callable[..., Any], packed_function: bytes) -> bytes:
    """The 16-byte identity of ``function``, given its cloudpickle bytes."""
    digest = hashlib.blake2b(packed_function, digest_size=16)
    try:
        digest.update(_code_of(function))
    except Exception:  # code that marshal cannot write: the pickle alone names it
        pass
    return digest.digest()


def call_key(function_id: bytes, packed_arguments: bytes) -> bytes:
    """The key of a call's first occurrence: its function and its pickled arguments."""
    return hashlib.blake2b(packed_arguments, digest_size=16, key=function_id).digest()


def call_keys(function_id: bytes, packed_arguments: Iterable[bytes]) -> list[bytes]:
    """:func:`call_key` of many calls of one function (the keyed hash is set up once)."""
    base = hashlib.blake2b(digest_size=16, key=function_id)
    keys = []
    for packed in packed_arguments:
        digest = base.copy()
        digest.update(packed)
        keys.append(digest.digest())
    return keys


class Occurrences:
    """Numbers the repeats of one call in a run: the first keeps its key, the next get others.

    Thread-safe; holds one small entry per distinct call made in the run.
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._repeats: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def keys(self, first_keys: list[bytes]) -> list[bytes]:
        """:meth:`key` of each of ``first_keys``, in order."""
        with self._lock:
            seen = self._seen
            if seen.isdisjoint(first_keys) and len(set(first_keys)) == len(first_keys):
                seen.update(first_keys)
                return first_keys
        return [self.key(first_key) for first_key in first_keys]

    def key(self, first_key: bytes) -> bytes:
        """The key of this occurrence of the call whose first occurrence has ``first_key``."""
        with self._lock:
            if first_key not in self._seen:
                self._seen.add(first_key)
                return first_key
            turn = self._repeats.get(first_key, 0) + 1
            self._repeats[first_key] = turn
        return hashlib.blake2b(turn.to_bytes(8, "little"), digest_size=16,
                               key=first_key).digest()
