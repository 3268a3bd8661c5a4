"""The client's view of a store: what is recorded, a recorded result by its call's key.

:class:`ResultStore` reads the index of every segment once, when the executor starts (headers
only: the kind and keys of each record and where it is), and reads a result's bytes only when
the call is made again. Records written after that, by this run or another program, are not
looked for: a run uses what earlier runs left.
"""

from __future__ import annotations

import getpass
import os
import pickle
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from . import frames, segments
from .identity import column_keys

#: What a lookup returns when the call is not recorded (or its record is torn).
MISSING = object()


@dataclass
class StoreIndex:
    """Where each record of a store is.

    Attributes
    ----------
    calls : dict
        Call key to ``(segment number, offset)``, or ``(segment number, offset, position)``
        for a call of a ``CALLS`` record (once :func:`expand_call_chunks` read them).
    blocks : dict
        ``(job key, block key)`` to ``(segment number, offset)``.
    outputs : dict
        Output key to ``(claim key, segment number, offset)`` of each claim of that output
        by a block job (:meth:`ResultStore.claim`).
    functions : dict
        Function id to the function's name.
    calls_per_function : collections.Counter
        Recorded calls of each function id.
    call_chunks : list
        ``(function id, segment number, offset)`` of each ``CALLS`` record not yet read.
    runs : list of dict
        What each run that used the store recorded about itself.
    data : list
        The bytes of each segment (memory maps for local files).
    names : list of str
        Each segment's path or URL.

    """

    calls: dict[bytes, tuple[int, ...]] = field(default_factory=dict)
    blocks: dict[tuple[bytes, bytes], tuple[int, int]] = field(default_factory=dict)
    outputs: dict[bytes, list[tuple[bytes, int, int]]] = field(default_factory=dict)
    functions: dict[bytes, str] = field(default_factory=dict)
    calls_per_function: Counter = field(default_factory=Counter)
    call_chunks: list[tuple[bytes, int, int]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    data: list[bytes | memoryview] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    #: The results of the ``CALLS`` record read last: ``((number, offset), results)``.
    last_results: tuple[tuple[int, int], list[Any]] | None = None


def read_index(location: str, *, with_runs: bool = True, expand: bool = True) -> StoreIndex:
    """Index every whole record of the store at ``location``.

    ``expand``: also key the calls of ``CALLS`` records (:func:`expand_call_chunks`), which
    reads their arguments; otherwise they wait in ``call_chunks``.
    """
    index = StoreIndex()
    for name, data in segments.iter_segments(location):
        number = len(index.data)
        index.data.append(data)
        index.names.append(name)
        for offset, kind, first, second, _ in frames.scan(data):
            if kind == frames.CALL:
                index.calls[second] = (number, offset)
                index.calls_per_function[first] += 1
            elif kind == frames.CALLS:
                index.call_chunks.append((first, number, offset))
                index.calls_per_function[first] += frames.key_count(second)
            elif kind == frames.BLOCK:
                index.blocks[(first, second)] = (number, offset)
            elif kind == frames.OUTPUT:
                index.outputs.setdefault(first, []).append((second, number, offset))
            elif kind == frames.FUNCTION:
                try:
                    index.functions[first] = frames.read_payload(data, offset).decode()
                except (frames.TornRecord, UnicodeDecodeError):
                    pass
            elif kind == frames.RUN and with_runs:
                try:
                    index.runs.append(pickle.loads(frames.read_payload(data, offset)))
                except Exception:  # torn, or written by a newer version
                    pass
    if expand:
        expand_call_chunks(index)
    return index


def expand_call_chunks(index: StoreIndex) -> None:
    """Add the calls of every ``CALLS`` record to ``index.calls``.

    Their keys are derived from their arguments. A torn record is left out: its calls run
    again.
    """
    chunks, index.call_chunks = index.call_chunks, []
    for function_id, number, offset in chunks:
        try:
            payload = frames.read_payload(index.data[number], offset)
            arguments_size, _ = frames.CALLS_HEADER.unpack_from(payload)
            columns, overrides = pickle.loads(
                payload[frames.CALLS_HEADER.size:frames.CALLS_HEADER.size + arguments_size])
        except Exception:  # torn, or written by a newer version
            continue
        calls = index.calls
        for position, key in enumerate(column_keys(function_id, columns, overrides)):
            calls[key] = (number, offset, position)


def read_record(index: StoreIndex, where: tuple[int, ...]) -> Any:
    """The unpickled payload of the record at ``where``, or :data:`MISSING` if it is torn."""
    if len(where) == 3:
        return _read_from_calls(index, where)
    number, offset = where
    try:
        return pickle.loads(frames.read_payload(index.data[number], offset))
    except frames.TornRecord:
        return MISSING


def _read_from_calls(index: StoreIndex, where: tuple[int, ...]) -> Any:
    """The result at ``position`` in the ``CALLS`` record at ``(number, offset)``."""
    number, offset, position = where
    cached = index.last_results
    if cached is None or cached[0] != (number, offset):
        try:
            payload = frames.read_payload(index.data[number], offset)
        except frames.TornRecord:
            return MISSING
        arguments_size, encoding = frames.CALLS_HEADER.unpack_from(payload)
        results = pickle.loads(payload[frames.CALLS_HEADER.size + arguments_size:])
        if encoding == frames.RESULTS_EACH:
            results = [MISSING if packed is None else pickle.loads(packed)
                       for packed in results]
        cached = index.last_results = ((number, offset), results)
    return cached[1][position]


class ResultStore:
    """A run's link to its store: recorded results by key, and the run's own records.

    Parameters
    ----------
    location : str or os.PathLike
        A local or shared-filesystem directory, or an ``fsspec`` URL. Made if missing
        (mode 700 on a filesystem: the results are the user's alone).
    run_name : str
        The run's name, recorded with when and where it ran.

    """

    def __init__(self, location: str | os.PathLike[str], run_name: str) -> None:
        self.location = segments.normalized_location(location)
        segments.create(self.location)
        self.index = read_index(self.location, with_runs=False, expand=False)
        self.run_name = run_name
        self.hits = 0
        self._expanding = threading.Lock()
        self._writer = segments.SegmentWriter(self.location, "r")
        self._named: set[bytes] = set(self.index.functions)
        self._claims_made: dict[bytes, list[tuple[int, bytes, bytes]]] = {}
        self._writer.write([frames.frame(frames.RUN, frames.ZERO_KEY, frames.ZERO_KEY,
                                         pickle.dumps(_run_facts(run_name)))])

    def __repr__(self) -> str:
        return f"ResultStore({self.location!r}, {len(self.index.calls)} calls recorded)"

    def name_function(self, function_id: bytes, name: str) -> None:
        """Record the name of a function this run calls (once per function and store)."""
        if function_id in self._named:
            return
        self._named.add(function_id)
        self._writer.write([frames.frame(frames.FUNCTION, function_id, frames.ZERO_KEY,
                                         name.encode())])

    def has_calls_of(self, function_id: bytes) -> bool:
        """Whether the store held calls of the function when the run started."""
        return self.index.calls_per_function[function_id] > 0

    def result(self, key: bytes) -> Any:
        """The recorded result of the call with ``key``, or :data:`MISSING`."""
        if self.index.call_chunks:
            with self._expanding:
                expand_call_chunks(self.index)
        where = self.index.calls.get(key)
        if where is None:
            return MISSING
        return self._load(where)

    def block(self, job_key: bytes, block_key: bytes) -> Any:
        """The recorded outcome of a block of ``map_blocks``, or :data:`MISSING`."""
        where = self.index.blocks.get((job_key, block_key))
        return MISSING if where is None else self._load(where)

    def claims(self, output_key: bytes) -> list[tuple[int, bytes, bytes]]:
        """The whole claims of an output: ``(time in ns, claim key, job key)``, oldest first."""
        found = []
        for claim_key, number, offset in self.index.outputs.get(output_key, []):
            try:
                job_key, when = pickle.loads(frames.read_payload(self.index.data[number],
                                                                 offset))
            except Exception:  # torn, or written by a newer version
                continue
            found.append((when, claim_key, job_key))
        return sorted(found + self._claims_made.get(output_key, []))

    def claim(self, output_key: bytes, job_key: bytes) -> bytes:
        """Record that the block job ``job_key`` (re)creates an output; return the claim's key.

        The output's blocks recorded under earlier claims are no longer its content.
        """
        claim_key, when = os.urandom(16), time.time_ns()
        self._writer.write([frames.frame(frames.OUTPUT, output_key, claim_key,
                                         pickle.dumps((job_key, when)))])
        self._claims_made.setdefault(output_key, []).append((when, claim_key, job_key))
        return claim_key

    def _load(self, where: tuple[int, int]) -> Any:
        value = read_record(self.index, where)
        if value is not MISSING:
            self.hits += 1
        return value

    def results(self, keys: Sequence[bytes]) -> list[Any]:
        """The recorded result of each key, or :data:`MISSING` for each not recorded."""
        return [self.result(key) for key in keys]

    def close(self) -> None:
        """Close the run's segment and let go of the segments' memory maps."""
        self._writer.close()
        self.index = StoreIndex()


def _run_facts(run_name: str) -> dict[str, Any]:
    try:
        user = getpass.getuser()
    except Exception:
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return {"run": run_name, "started": time.time(), "host": socket.gethostname(),
            "user": user, "pid": os.getpid(), "argv": list(sys.argv)}


def pack_result(value: Any) -> bytes:
    """A result's bytes as a store keeps them."""
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
