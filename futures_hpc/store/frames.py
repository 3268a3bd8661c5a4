"""Records in append-only segment files: framing, checksums, reading what is whole.

A store is a directory of *segment* files. Each segment has exactly one writer (one worker
process, or one client run) that only ever appends to it, so no two processes ever write the
same file and no lock is needed, on one machine or across the nodes of a parallel filesystem.

Every record is framed as::

    magic (4 bytes) | body length (4 bytes, little-endian) | CRC-32 of the body (4 bytes) | body

and its body starts with a one-byte kind and two 16-byte keys, then the payload. A writer
killed in the middle of a record leaves a torn tail: its length runs past the end of the file,
or its checksum does not match. Readers stop at the first record that is not whole (the rest of
the file can only be that tail), and a record whose checksum fails when its payload is read is
treated as missing, so its call simply runs again.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

#: The first bytes of every record.
MAGIC = b"FHR1"
_HEADER = struct.Struct("<4sII")
HEADER_SIZE = _HEADER.size
#: Bytes of the kind and the two keys at the start of every body.
KEYS_SIZE = 1 + 16 + 16

#: Record kinds.
CALL = 1  #: a call's result: function id, call key, pickled result
FUNCTION = 2  #: a function's name: function id, zero key, the name in UTF-8
RUN = 3  #: a run of a program: zero key, run key, pickled facts about it
BLOCK = 4  #: a block of ``map_blocks`` done: job key, block key, pickled partial (or None)
OUTPUT = 5  #: an output claimed by a block job: output key, claim key, pickled (job key, time)
#: calls of a chunk keyed by its worker: function id, :func:`count_key`, then
#: :data:`CALLS_HEADER`, the pickled ``(argument columns, {position: key})`` and the results
CALLS = 6

#: The start of a ``CALLS`` record's payload: the length of its pickled arguments, and how its
#: results are pickled (:data:`RESULTS_LIST` or :data:`RESULTS_EACH`).
CALLS_HEADER = struct.Struct("<IB")
#: The results are one pickled list.
RESULTS_LIST = 0
#: The results are a pickled list of each result's own bytes (None: not recorded).
RESULTS_EACH = 1

ZERO_KEY = bytes(16)


def count_key(count: int) -> bytes:
    """The second key of a ``CALLS`` record: how many calls it holds."""
    return count.to_bytes(8, "little") + bytes(8)


def key_count(key: bytes) -> int:
    """The number of calls a ``CALLS`` record holds, from its second key."""
    return int.from_bytes(key[:8], "little")


class TornRecord(Exception):  # noqa: N818 - a condition, not an error to report
    """A record whose checksum does not match: written only in part."""


def frame(kind: int, first_key: bytes, second_key: bytes, payload: bytes) -> bytes:
    """One framed record, ready to append."""
    body = bytes((kind,)) + first_key + second_key + payload
    return _HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body


def scan(data: bytes | memoryview) -> Iterator[tuple[int, int, bytes, bytes, int]]:
    """The whole records of a segment: ``(offset, kind, first key, second key, body length)``.

    Stops at the first record that runs past the end or does not start with :data:`MAGIC`
    (a torn tail). Checksums are not verified here, only when a payload is read
    (:func:`read_payload`), so that indexing a store reads only the headers' bytes.
    """
    view = memoryview(data)
    size = len(view)
    offset = 0
    while offset + HEADER_SIZE + KEYS_SIZE <= size:
        magic, length, _ = _HEADER.unpack_from(view, offset)
        end = offset + HEADER_SIZE + length
        if magic != MAGIC or length < KEYS_SIZE or end > size:
            return
        start = offset + HEADER_SIZE
        yield (offset, view[start], bytes(view[start + 1:start + 17]),
               bytes(view[start + 17:start + 33]), length)
        offset = end


def read_payload(data: bytes | memoryview, offset: int) -> bytes:
    """The payload of the record at ``offset``, its checksum verified.

    Raises
    ------
    TornRecord
        The record is not whole (its writer died while writing it).

    """
    view = memoryview(data)
    magic, length, checksum = _HEADER.unpack_from(view, offset)
    body = view[offset + HEADER_SIZE:offset + HEADER_SIZE + length]
    if magic != MAGIC or len(body) != length or zlib.crc32(body) != checksum:
        raise TornRecord(f"the record at byte {offset} is torn")
    return bytes(body[KEYS_SIZE:])
