"""What runs on the worker: calls packed as one opaque payload, and their outcomes.

A call (or a chunk of calls) travels to the worker as a single cloudpickle byte string, and its
outcome comes back the same way. distributed then sends one opaque buffer instead of walking
argument containers element by element (see ``INFRA.md``: 70x faster for batches of plain
values), and calls are never merged or cached because every task gets a key of its own.

A remote exception comes back as itself, with the remote traceback attached as its
``__cause__``, exactly as :class:`concurrent.futures.ProcessPoolExecutor` does.
"""

from __future__ import annotations

import pickle
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from .call_clock import call_clock, run_queue_seconds
from .relay import packed_task_news, ran_before
from .store.recorder import ChunkRecorder, StoreSpec, TaskRecorder, recorded_results
from .store.results import MISSING

#: The outcome of a call that the task skipped: it finished on a worker that died since.
SKIPPED = ("skip", None)


class RemoteTraceback(Exception):  # noqa: N818 - named as the standard library names it
    """The traceback of an exception raised on a worker, attached as its ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _rebuild_exception(exception: BaseException, remote_text: str) -> BaseException:
    exception.__cause__ = RemoteTraceback(remote_text)
    return exception


class _ExceptionWithTraceback:
    """Carries an exception and its formatted traceback through pickle."""

    def __init__(self, exception: BaseException) -> None:
        text = "".join(
            traceback.format_exception(type(exception), exception, exception.__traceback__)
        )
        self.exception = exception
        self.text = f'\n"""\n{text}"""'

    def __reduce__(self):
        return _rebuild_exception, (self.exception, self.text)


def with_remote_traceback(exception: BaseException) -> Any:
    """Wrap an exception raised on a worker for its trip back to the client.

    Parameters
    ----------
    exception : BaseException
        The exception, caught on the worker (its ``__traceback__`` is formatted now).

    Returns
    -------
    object
        A picklable wrapper that unpickles as ``exception`` itself, with the remote traceback
        attached as its ``__cause__`` (a :class:`RemoteTraceback`).

    """
    return _ExceptionWithTraceback(exception)


class UnpicklableRemoteError(RuntimeError):
    """A remote exception (or result) that could not be pickled, described by its text."""


class PlaceholderArgument:
    """Stands in a payload for a top-level argument that dask passes to the task separately."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def pack_function(function: Callable[..., Any]) -> bytes:
    """Pickle a function once for every chunk of a map."""
    return cloudpickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)


def pack_chunk(packed_function: bytes, columns: Sequence[Sequence[Any]],
               store: StoreSpec | None = None) -> bytes:
    """Pickle a chunk of calls of one function into an opaque payload.

    Parameters
    ----------
    packed_function : bytes
        From :func:`pack_function`.
    columns : sequence of sequences
        One sequence of arguments per parameter, all of the chunk's length (call ``i`` is
        ``function(*(column[i] for column in columns))``). Slices of the caller's lists travel
        as they are, without building a tuple per call.
    store : StoreSpec, optional
        Where to record each successful call's result (one key per call).
    """
    return cloudpickle.dumps((packed_function, columns, store),
                             protocol=pickle.HIGHEST_PROTOCOL)


def _pack_outcome(outcome: tuple[Any, ...]) -> bytes:
    try:
        return cloudpickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # the result or the exception cannot be pickled
        replacement = UnpicklableRemoteError(
            f"the call's outcome could not be pickled ({error!r}); outcome: {outcome!r:.2000}"
        )
        wrapped = _ExceptionWithTraceback(replacement)
        failed = ("chunk", [], wrapped, None) if outcome[0] == "chunk" else ("error", wrapped)
        return cloudpickle.dumps(failed)


def _substitute(value: Any, dependencies: Sequence[Any]) -> Any:
    return dependencies[value.index] if isinstance(value, PlaceholderArgument) else value


def _pack_outcomes(outcomes: list[tuple[str, Any]], seconds: float | None) -> bytes:
    """Pack a batch's outcomes; an outcome that cannot be pickled fails its call alone."""
    try:
        return cloudpickle.dumps(("calls", outcomes, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # find the unpicklable ones
        checked = []
        for outcome in outcomes:
            try:
                cloudpickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as error:
                outcome = ("error", _ExceptionWithTraceback(UnpicklableRemoteError(
                    f"the call's outcome could not be pickled ({error!r}); outcome: "
                    f"{outcome!r:.2000}"
                )))
            checked.append(outcome)
        return cloudpickle.dumps(("calls", checked, seconds), protocol=pickle.HIGHEST_PROTOCOL)


def run_calls(payload: bytes, *dependencies: Any) -> bytes:
    """Run a packed batch of calls of one function on the worker, each on its own.

    Parameters
    ----------
    payload : bytes
        ``pickle.dumps((packed_function, [packed (args, kwargs) per call], store))``, where
        ``store`` is a :class:`~futures_hpc.store.StoreSpec` (each successful call's result is
        recorded there) or None.
    *dependencies
        Values of the ``distributed.Future`` arguments (batches of one call only), put where
        :class:`PlaceholderArgument` stands.

    Returns
    -------
    bytes
        The packed ``("calls", outcomes, seconds)``: ``("ok", result)`` or ``("error",
        exception)`` per call, and the seconds the calls took (for :mod:`futures_hpc.chunking`;
        on :func:`~futures_hpc.call_clock.call_clock`, which leaves out waits for a CPU).
        A call that finished before the task's earlier worker died is skipped (:data:`SKIPPED`).

    Notes
    -----
    With more than one call and the relay installed, the outcomes of finished calls also go to
    the client while the task runs (:class:`futures_hpc.relay.TaskNews`).

    """
    outcomes: list[tuple[str, Any]] = []
    packed_function, packed_calls, store = pickle.loads(payload)
    try:
        function = pickle.loads(packed_function)
    except BaseException as error:  # noqa: BLE001 - every call fails with it
        failed = ("error", _ExceptionWithTraceback(error))
        return _pack_outcomes([failed] * len(packed_calls), None)
    news, finished = packed_task_news(len(packed_calls))
    recorder = None if store is None else TaskRecorder(store)
    started = call_clock()
    for number, packed in enumerate(packed_calls):
        if finished and number in finished:
            outcomes.append(SKIPPED)
            continue
        try:
            args, kwargs = pickle.loads(packed)
            if dependencies:
                args = tuple(_substitute(value, dependencies) for value in args)
                kwargs = {key: _substitute(value, dependencies) for key, value in kwargs.items()}
            result = function(*args, **kwargs)
        except BaseException as error:  # noqa: BLE001 - every exception goes back to the caller
            outcome: tuple[str, Any] = ("error", _ExceptionWithTraceback(error))
        else:
            outcome = ("ok", result)
            if recorder is not None:
                recorder.add(number, result)
            del result
        outcomes.append(outcome)
        if news is not None:
            news.add(number, outcome)
    seconds = call_clock() - started
    if news is not None:
        news.close()
    if recorder is not None:
        recorder.flush()
    return _pack_outcomes(outcomes, seconds)


def run_chunks(payload: bytes) -> bytes:
    """Run several packed chunks of ``map`` in one task, in order, each as :func:`run_chunk`.

    The call queue packs chunks measured as quick that wait together, so that a ``map`` with a
    small ``chunksize`` does not pay a dask task per chunk.

    Parameters
    ----------
    payload : bytes
        ``pickle.dumps([payload of run_chunk per chunk])``.

    Returns
    -------
    bytes
        The packed ``("chunks", outcomes)``: what :func:`run_chunk` returned for each chunk.

    Notes
    -----
    Whether the task ran before, on a worker since lost, is asked once (the scheduler's word is
    taken by the first to ask) and holds for every chunk: each then takes the results its calls
    recorded in the store. The thread's wait for a CPU is read once for the task, not twice per
    chunk: each chunk times itself on the wall clock and is charged its share of that wait.
    """
    before = ran_before()
    waited = run_queue_seconds()
    outcomes = [_chunk_outcome(chunk, before, time.perf_counter)
                for chunk in pickle.loads(payload)]
    waited = run_queue_seconds() - waited
    walls = sum(outcome[3] for outcome in outcomes if outcome[3] is not None)
    # Each chunk's share of the wait for a CPU, by its wall time.
    kept = max(0.0, 1 - waited / walls) if waited > 0 and walls > 0 else 1.0
    packed = []
    for index, outcome in enumerate(outcomes):
        outcomes[index] = None  # dropped once packed: one chunk is held twice at most
        if outcome[3] is not None:
            outcome = (*outcome[:3], outcome[3] * kept)
        packed.append(_pack_outcome(outcome))
        del outcome
    return pickle.dumps(("chunks", packed), protocol=pickle.HIGHEST_PROTOCOL)


def run_chunk(payload: bytes) -> bytes:
    """Run a packed chunk of calls in order; stop at the first failure.

    Returns
    -------
    bytes
        The packed ``("chunk", results, error, seconds)``: the results of the calls before the
        first failure, that failure (or None), and the seconds the calls took (for
        :mod:`futures_hpc.chunking`; on :func:`~futures_hpc.call_clock.call_clock`).

    """
    return _run_chunk(payload, None)


def _run_chunk(payload: bytes, before: bool | None) -> bytes:
    """Run a chunk as :func:`run_chunk` does, told whether its task ran before.

    ``before`` None: ask the scheduler's word (:func:`~futures_hpc.relay.ran_before`), if the
    chunk records in a store.
    """
    return _pack_outcome(_chunk_outcome(payload, before, call_clock))


def _chunk_outcome(payload: bytes, before: bool | None,
                   clock: Callable[[], float]) -> tuple[str, list[Any], Any, float | None]:
    """Run a chunk; its outcome ``("chunk", results, error, seconds)``, timed on ``clock``."""
    results: list[Any] = []
    started = None
    recorder = None
    try:
        packed_function, columns, store = pickle.loads(payload)
        function = pickle.loads(packed_function)
        started = clock()
        if store is not None:
            recorder = (TaskRecorder(store) if store.keys is not None
                        else ChunkRecorder(store, columns, results))
            # Run again after its worker was lost: the calls recorded meanwhile are not rerun.
            if before is None:
                before = ran_before()
            recorded = recorded_results(store, columns) if before else None
            if recorded is None and isinstance(recorder, ChunkRecorder):
                _run_plain(function, columns, results)
            else:
                _run_recorded(function, columns, recorder, results, recorded)
        else:
            _run_plain(function, columns, results)
    except BaseException as error:  # noqa: BLE001
        seconds = None if started is None else clock() - started
        if recorder is not None:
            recorder.close()
        return ("chunk", results, _ExceptionWithTraceback(error), seconds)
    seconds = clock() - started
    if recorder is not None:
        recorder.close()
    return ("chunk", results, None, seconds)


def _run_recorded(function: Callable[..., Any], columns: Sequence[Sequence[Any]],
                  recorder: TaskRecorder | ChunkRecorder, results: list[Any],
                  recorded: Sequence[Any] | None = None) -> None:
    """Run a chunk's calls in order, recording each result.

    ``recorded``: a result per call, :data:`~futures_hpc.store.MISSING` for those to run.
    """
    add = recorder.add
    for number, arguments in enumerate(zip(*columns, strict=True)):
        if recorded is not None and recorded[number] is not MISSING:
            results.append(recorded[number])
            continue
        result = function(*arguments)
        results.append(result)
        add(number, result)


def _run_plain(function: Callable[..., Any], columns: Sequence[Sequence[Any]],
               results: list[Any]) -> None:
    """Run a chunk's calls in order, appending each result: nothing else per call.

    A worker-keyed chunk runs so too: the store's thread writes its calls from ``results``
    (:mod:`futures_hpc.store.flusher`).
    """
    if len(columns) == 1:
        for argument in columns[0]:
            results.append(function(argument))
    else:
        for arguments in zip(*columns, strict=True):
            results.append(function(*arguments))


def unpack_outcome(packed: bytes) -> tuple[Any, ...]:
    """Unpickle an outcome made by :func:`run_calls` or :func:`run_chunk`."""
    return pickle.loads(packed)
