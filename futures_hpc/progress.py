"""Progress bars for long maps: shown on a terminal, silent in a log file."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO

#: Terminal size assumed when the terminal does not report its own.
DEFAULT_COLUMNS = 80
DEFAULT_ROWS = 24
#: Seconds between two looks at a bar's note (e.g. why the batch jobs still wait).
NOTE_INTERVAL_SECONDS = 1.0


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: standard error) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def terminal_columns(stream: TextIO) -> int:
    """The width of the terminal behind ``stream`` in columns (0 if unknown)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def track(
    items: Iterable[Any],
    total: int | None,
    description: str = "futures_hpc",
    enabled: bool | None = None,
    stream: TextIO | None = None,
    note: Callable[[], str | None] | None = None,
) -> Iterator[Any]:
    """Yield ``items`` while a progress bar counts them.

    Parameters
    ----------
    items : iterable
        What to yield.
    total : int or None
        How many items to expect, if known.
    description : str
        The bar's label.
    enabled : bool, optional
        Force the bar on or off; by default it shows only when ``stream`` is a terminal.
    stream : file, optional
        Where the bar is drawn (standard error by default).
    note : callable, optional
        Called about every :data:`NOTE_INTERVAL_SECONDS` (in a thread, also while no item
        arrives); the text it returns is shown after the bar, None shows nothing. The batch
        executors say there why their jobs still wait in the queue.

    """
    stream = stream or sys.stderr
    if enabled is None:
        enabled = is_terminal(stream)
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    # A terminal that reports a size of 0 (some CI ptys, editors' shells) gets no bar at all
    # from tqdm unless given one.
    width = terminal_columns(stream)
    sizing = (
        {"dynamic_ncols": True} if width else {"ncols": DEFAULT_COLUMNS, "nrows": DEFAULT_ROWS}
    )
    with tqdm(total=total, desc=description, file=stream, unit="call", **sizing) as bar:
        stop_notes = _show_notes(bar, note) if note is not None else None
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            if stop_notes is not None:
                stop_notes()
            close = getattr(items, "close", None)
            if close is not None:  # an early stop cancels what the map has not yielded
                close()


def _show_notes(bar: Any, note: Callable[[], str | None]) -> Callable[[], None]:
    """Show ``note()`` after ``bar`` whenever it changes, from a thread; return its stopper."""
    stopped = threading.Event()

    def refresh() -> None:
        shown: str | None = None
        while True:
            try:
                text = note() or ""
            except Exception:  # a note is a courtesy: never let it break the bar
                text = ""
            if text != shown:
                bar.set_postfix_str(text, refresh=True)
                shown = text
            if stopped.wait(NOTE_INTERVAL_SECONDS):
                return

    thread = threading.Thread(target=refresh, name="futures_hpc-progress-note", daemon=True)
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)

    return stop
