"""Progress bars for long maps: shown on a terminal, silent in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: standard error) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def track(
    items: Iterable[Any],
    total: int | None,
    description: str = "futures_hpc",
    enabled: bool | None = None,
    stream: TextIO | None = None,
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

    """
    stream = stream or sys.stderr
    if enabled is None:
        enabled = is_terminal(stream)
    if not enabled:
        yield from items
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=description, file=stream, unit="call", dynamic_ncols=True) as bar:
        try:
            for item in items:
                yield item
                bar.update(1)
        finally:
            close = getattr(items, "close", None)
            if close is not None:  # an early stop cancels what the map has not yielded
                close()
