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

A chunk of ``map`` whose arguments are all of :data:`WORKER_KEYED_TYPES`, of a function the
store holds nothing of, is keyed by the worker that runs it instead (see
:mod:`futures_hpc.store.recorder`): the client then only checks, with Python's ``hash`` of each
call, that none of its calls repeats an earlier one, and names the key of those that do.
"""

from __future__ import annotations

import functools
import hashlib
import marshal
import pickle
import threading
import types
from collections.abc import Callable, Iterable, Sequence
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


#: Argument types whose equal values always pickle to equal bytes (``bool``, ``float`` and
#: subclasses are left out: ``True == 1``, ``0.0 == -0.0`` and NaN is not equal to itself).
WORKER_KEYED_TYPES = frozenset({int, str, bytes, type(None)})


def column_keys(function_id: bytes, columns: Sequence[Sequence[Any]],
                overrides: dict[int, bytes] | None = None) -> list[bytes]:
    """The keys of a chunk's calls of plain arguments, ``overrides`` by position taking over."""
    dumps, protocol, no_keywords = pickle.dumps, pickle.HIGHEST_PROTOCOL, {}
    keys = call_keys(function_id, [dumps((call, no_keywords), protocol)
                                   for call in zip(*columns, strict=False)])
    for position, key in (overrides or {}).items():
        if position < len(keys):
            keys[position] = key
    return keys


def _identity(value: Any) -> int:
    """What tells one argument from another in :class:`_SeenCalls`: an int itself, or its hash."""
    return value if type(value) is int else hash(value)


def _common(seen: range, distinct: set[int]) -> set[int]:
    """The values of ``distinct`` in ``seen`` (walking the smaller of the two)."""
    if len(seen) <= len(distinct):
        return distinct.intersection(seen)
    return {value for value in distinct if value in seen}


class _SeenCalls:
    """The calls of one function made in a run, by hash: ranges of ints kept as ranges.

    A call of one argument is known by :func:`_identity` of it, a call of several by the hash
    of the tuple of its arguments. Each chunk's set of hashes is kept as it is (adding it to
    one big set would cost more than the check); past :data:`MAX_SETS` sets, they are merged.
    """

    MAX_SETS = 8

    def __init__(self) -> None:
        self.sets: list[set[int]] = []
        self.ranges: list[range] = []

    def __contains__(self, call_hash: int) -> bool:
        return (any(call_hash in seen for seen in self.sets)
                or any(call_hash in seen for seen in self.ranges))

    def add_one(self, call_hash: int) -> None:
        """Remember one call, not seen before."""
        if not self.sets:
            self.sets.append(set())
        self.sets[-1].add(call_hash)

    def add_range(self, column: range) -> list[int]:
        """Remember a range of calls; return the positions in it of those seen before."""
        positions: set[int] = set()
        for seen in self.ranges:
            if seen.step == 1 and column.step == 1:
                low, high = max(seen.start, column.start), min(seen.stop, column.stop)
                positions.update(range(low - column.start, high - column.start))
            else:
                smaller, other = (seen, column) if len(seen) < len(column) else (column, seen)
                positions.update(column.index(value) for value in smaller if value in other)
        for hashes in self.sets:
            if len(hashes) < len(column):
                positions.update(column.index(value) for value in hashes if value in column)
            else:
                positions.update(position for position, value in enumerate(column)
                                 if value in hashes)
        last = self.ranges[-1] if self.ranges else None
        if (last is not None and last.step == column.step == 1 and last.stop == column.start):
            self.ranges[-1] = range(last.start, column.stop)  # the next chunk of one map
        else:
            self.ranges.append(column)
        return sorted(positions)

    def add_hashes(self, call_hashes: Sequence[int]) -> list[int] | None:
        """Remember calls by hash; the positions of those seen before, None for a repeat within."""
        distinct = set(call_hashes)
        if len(distinct) != len(call_hashes):
            return None
        repeated: set[int] = set()
        for seen in self.ranges:
            repeated |= _common(seen, distinct)
        for hashes in self.sets:
            if not hashes.isdisjoint(distinct):
                repeated |= hashes & distinct
        self.sets.append(distinct)
        if len(self.sets) > self.MAX_SETS:
            self.sets.sort(key=len)
            merged = self.sets.pop()
            for hashes in self.sets:
                merged.update(hashes)
            self.sets = [merged]
        if not repeated:
            return []
        return [position for position, call_hash in enumerate(call_hashes)
                if call_hash in repeated]


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

    Calls keyed in the client are remembered by key. Calls of a function keyed by the workers
    (:meth:`worker_keyed`) are remembered by Python's ``hash``; a later call with the same hash
    is keyed in the client, as a repeat. Two different calls with the same hash (``-1`` and
    ``-2``) are then taken for repeats: the second is recorded under another key than a
    later run gives it, so that run computes it again, which costs time, never a wrong result.

    Thread-safe; holds one small entry per distinct call made in the run.
    """

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._repeats: dict[bytes, int] = {}
        self._calls: dict[bytes, _SeenCalls] = {}
        self._lock = threading.Lock()

    def keys(self, first_keys: list[bytes], function_id: bytes | None = None,
             calls: Sequence[tuple[Any, ...]] | None = None) -> list[bytes]:
        """The key of each call's occurrence, given its first occurrence's key, in order.

        ``calls``: the calls themselves, when their arguments are all of
        :data:`WORKER_KEYED_TYPES` and ``function_id``'s calls may be keyed by the workers:
        they are then also remembered by hash, and a repeat of a worker-keyed call is found.
        """
        with self._lock:
            if calls is not None and function_id is not None:
                seen_calls = self._calls.setdefault(function_id, _SeenCalls())
                keys = []
                for first_key, call in zip(first_keys, calls, strict=True):
                    call_hash = _identity(call[0]) if len(call) == 1 else hash(call)
                    if call_hash in seen_calls:  # maybe the repeat of a worker-keyed call
                        self._seen.add(first_key)
                    else:
                        seen_calls.add_one(call_hash)
                    keys.append(self._key(first_key))
                return keys
            seen = self._seen
            if seen.isdisjoint(first_keys) and len(set(first_keys)) == len(first_keys):
                seen.update(first_keys)
                return first_keys
            return [self._key(first_key) for first_key in first_keys]

    def _key(self, first_key: bytes) -> bytes:
        """The key of this occurrence of the call whose first occurrence has ``first_key``."""
        if first_key not in self._seen:
            self._seen.add(first_key)
            return first_key
        turn = self._repeats.get(first_key, 0) + 1
        self._repeats[first_key] = turn
        return hashlib.blake2b(turn.to_bytes(8, "little"), digest_size=16,
                               key=first_key).digest()

    def worker_keyed(self, function_id: bytes, columns: Sequence[Sequence[Any]],
                     types: set[type]) -> dict[int, bytes] | None:
        """Let a worker key a chunk's calls: the keys of those that repeat earlier calls.

        ``columns`` hold arguments of :data:`WORKER_KEYED_TYPES` only, of ``types``. Returns
        the key of each call, by position, that repeats a call made before in this run (usually
        none), or None if a call repeats another of the same chunk: the client keys that chunk
        itself.
        """
        single = columns[0] if len(columns) == 1 else None
        identities: Sequence[int]
        if single is None:
            identities = list(map(hash, zip(*columns, strict=False)))
        elif type(single) is range or types == {int}:
            identities = single  # ints are their own identity
        elif int in types:
            identities = [_identity(value) for value in single]
        else:
            identities = list(map(hash, single))
        with self._lock:
            seen_calls = self._calls.setdefault(function_id, _SeenCalls())
            if type(identities) is range:
                positions: list[int] | None = seen_calls.add_range(identities)
            else:
                positions = seen_calls.add_hashes(identities)
            if positions is None:
                return None
            if not positions:
                return {}
            first_keys = column_keys(function_id, [[column[position] for position in positions]
                                                   for column in columns])
            self._seen.update(first_keys)  # their first occurrences were keyed by workers
            return {position: self._key(first_key)
                    for position, first_key in zip(positions, first_keys, strict=True)}
