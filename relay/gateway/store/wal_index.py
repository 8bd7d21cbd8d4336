"""A look at SQLite's WAL-index header: whether anyone committed to a database, for the
price of reading 48 bytes of shared memory.

In WAL mode every connection to a database, in any process, maps the same wal-index
(the ``-shm`` file beside the database). Its header (documented in SQLite's "WAL-mode
File Format", https://www.sqlite.org/walformat.html, and shared by every SQLite version
since 3.7.0, which is why it cannot move) is rewritten by each commit: the commit
counter, the last valid frame, the salts of a restarted log. The first of its two
copies is written last, after a memory barrier, and before the commit returns. So when
the first copy's bytes are those seen before, nobody has committed since; when they
differ, someone may have (a checkpoint restarting the log, a recovery), which costs
the caller no more than a cache emptied once too often.

That is what ``PRAGMA data_version`` answers too, but the pragma is a statement (a read
transaction, a cursor, a row): about 11,000 instructions against a few hundred here, on
a path that asks once per proxied request. :meth:`WalIndexHeader.open` returns None
where the header cannot be read this way (no ``-shm`` file, an unknown version): the
store then asks the pragma.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Optional

__all__ = ["HEADER_SIZE", "WalIndexHeader"]

#: Bytes in one copy of the header (it is followed by the second copy).
HEADER_SIZE = 48
#: ``iVersion``, the header's first field: the only wal-index format there is.
_VERSION = 3007000
_IS_INIT = 12  # offset of the isInit byte


class WalIndexHeader:
    """The first copy of the WAL-index header of an open WAL-mode database, mapped
    read-only; :meth:`read` gives its current bytes."""

    __slots__ = ("_map",)

    def __init__(self, mapped: mmap.mmap) -> None:
        self._map = mapped

    @classmethod
    def open(cls, database: str | os.PathLike[str]) -> Optional[WalIndexHeader]:
        """Map ``database``'s wal-index header, or None if there is none that can be
        read (the database must be open in WAL mode, by the caller, for the file to
        exist and stay)."""
        try:
            fd = os.open(os.fspath(database) + "-shm", os.O_RDONLY)
        except OSError:
            return None
        try:
            mapped = mmap.mmap(fd, HEADER_SIZE, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty or short file, a filesystem without mmap
            return None
        finally:
            os.close(fd)  # the mapping holds the file
        version, = struct.unpack_from("=I", mapped, 0)  # native order: it is shared memory
        if version != _VERSION or mapped[_IS_INIT] != 1:
            mapped.close()
            return None
        return cls(mapped)

    def read(self) -> bytes:
        """The header's bytes now: equal to an earlier read if nobody committed since."""
        return self._map[:HEADER_SIZE]

    def close(self) -> None:
        self._map.close()
