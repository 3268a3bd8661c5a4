"""``ex.map_blocks`` and ``ex.reduce_blocks``: the executor's doors to :mod:`futures_hpc.tiles`.

A base class of :class:`~futures_hpc.executor.HPCExecutor`. The tiles package (numpy, and the
raster libraries when used) is imported only when one of these is called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class BlockMethods:
    """The block methods of an executor (``self`` is the executor the blocks run on)."""

    # -- tiles ---------------------------------------------------------------------------------

    # The keywords are those of futures_hpc.tiles.map_blocks / reduce_blocks, written out again
    # so that help() and editors show them; tests/test_tiles.py checks the two stay the same,
    # and every keyword is forwarded through locals(), so none can be left behind.

    def map_blocks(
        self,
        func: Callable[..., Any],
        /,
        *inputs: Any,
        block: int | tuple[int, int] = (512, 512),
        overlap: int | tuple[int, int] = 0,
        boundary: str | float | None = "edge",
        out: Any = None,
        dtype: Any = None,
        otherargs: Any = None,
        progress: bool | Callable[[int, int], None] = False,
        fill_value: float = 0,
        on_error: str = "raise",
        max_in_flight: int | None = None,
        blocks_per_task: int | tuple[int, int] | None = None,
        shared_memory: bool | None = None,
        store: Any = None,
        creation_options: dict[str, Any] | None = None,
    ) -> Any:
        """Apply ``func`` block by block, with margins, over images far larger than memory.

        :func:`futures_hpc.tiles.map_blocks` run on this executor; its keywords are documented
        there and in ``docs/tiles.md``.

        Returns
        -------
        numpy.ndarray or the ``out`` given

        """
        keywords = dict(locals())  # the keywords above, before anything else is bound
        del keywords["self"], keywords["func"], keywords["inputs"]
        from . import tiles  # numpy and the raster libraries: imported on use only

        return tiles.map_blocks(self, func, *inputs, **keywords)

    def reduce_blocks(
        self,
        func: Callable[..., Any],
        /,
        *inputs: Any,
        combine: Callable[[Any, Any], Any],
        initial: Any = None,
        block: int | tuple[int, int] = (512, 512),
        overlap: int | tuple[int, int] = 0,
        boundary: str | float | None = "edge",
        otherargs: Any = None,
        progress: bool | Callable[[int, int], None] = False,
        fill_value: float = 0,
        on_error: str = "raise",
        max_in_flight: int | None = None,
        blocks_per_task: int | tuple[int, int] | None = None,
        shared_memory: bool | None = None,
        store: Any = None,
    ) -> Any:
        """Compute a statistic per block in the workers and combine them into one value.

        :func:`futures_hpc.tiles.reduce_blocks` run on this executor; its keywords are
        documented there and in ``docs/tiles.md``.

        Returns
        -------
        object
            The combined value.

        """
        keywords = dict(locals())  # the keywords above, before anything else is bound
        del keywords["self"], keywords["func"], keywords["inputs"]
        from . import tiles  # numpy and the raster libraries: imported on use only

        return tiles.reduce_blocks(self, func, *inputs, **keywords)
