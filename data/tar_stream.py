"""Members of a tar shard read from a byte stream, with the archive's integrity checked.

Python's ``tarfile`` read as a stream (``r|``) ends without a word when an archive is cut at
a header boundary or meets a corrupt header after its first member, so a shard that lost
most of its samples looks complete. This reader parses the 512-byte headers itself (with
``tarfile.TarInfo.frombuf``, which checks each header's checksum), requires the
end-of-archive marker, and raises :class:`TarDamage` saying where and how the archive broke.

Format facts relied on (POSIX ustar/pax, GNU tar): every member is a 512-byte header followed
by its data padded to a multiple of 512 bytes; an archive ends with two 512-byte blocks of
zeros (GNU tar accepts one, with a warning: so do we), after which the writer pads the
archive with zeros to a whole *record* (:data:`RECORD`); a pax ``x`` header carries ``path``
and ``size`` for the member that follows, a ``g`` header global defaults, a GNU ``L``/``K``
member the long name/link name of the next member. gzip, bzip2 and xz compressed tars are
recognised by their magic bytes (what ``tarfile``'s ``r|*`` mode accepted).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

BLOCK = 512
RECORD = 20 * BLOCK
"""tar's default record (blocking factor 20): what Python's ``tarfile`` (so webdataset's and
img2dataset's writers), GNU tar, bsdtar and POSIX pax for ustar pad an archive to."""
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_MAGIC = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
          (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))
# What a decompressor raises on damaged compressed data (not on a failing network read).
_COMPRESSED_DAMAGE = (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


class TarDamage(Exception):
    """The archive is broken at byte ``offset`` of the tar stream (uncompressed bytes).

    ``member``: the name of the member whose data was cut, when the break is inside one
    (its sample had started); None when the break is at or inside a header.
    ``zero_tail``: the "end-of-archive marker" is the start of zeros that run past the
    padding of the archive's last record (see :func:`tar_members`).
    """

    def __init__(self, offset: int, reason: str, member: str | None = None,
                 zero_tail: bool = False):
        super().__init__(f"{reason} at byte {offset}")
        self.offset = offset
        self.reason = reason
        self.member = member
        self.zero_tail = zero_tail


@dataclass
class TarMember:
    """One regular file of the archive; ``offset``: where its first header starts (its pax
    or GNU long-name header, if it has one), so a read can restart there; ``end``: where
    the next header starts (after this member's padded data)."""

    name: str
    data: bytes
    offset: int
    end: int


@dataclass
class ShardCursor:
    """Where an interrupted read of a shard goes on: ``samples`` complete samples were
    delivered, and the next one starts at tar byte ``offset``. A compressed shard cannot be
    entered mid-way (``compressed``): it is read again from the start, skipping ``samples``.
    ``version``: the object's version the offset was taken in
    (:func:`data.storage.object_version`; None when unknown or saved before it was kept).
    """

    offset: int = 0
    samples: int = 0
    compressed: bool = False
    version: str | None = None


def read_exact(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the stream (pipes may return short reads)."""
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class _Prefixed:
    """A stream with some already-read bytes put back in front of it."""

    def __init__(self, head: bytes, stream: IO[bytes]):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


class _DamageOnBadCompression:
    """Decompressed reads whose data errors become :class:`TarDamage` (network errors of the
    underlying stream pass through unchanged, so the caller can retry them)."""

    def __init__(self, stream: IO[bytes]):
        self.stream, self.offset = stream, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.stream.read(n)
        except _COMPRESSED_DAMAGE as err:
            raise TarDamage(self.offset, f"damaged compressed data ({err})") from None
        self.offset += len(data)
        return data


def open_tar_stream(stream: IO[bytes]) -> tuple[IO[bytes], bool]:
    """(the tar bytes of ``stream``, whether they are decompressed from it)."""
    head = read_exact(stream, 6)
    prefixed = _Prefixed(head, stream)
    for magic, opener in _MAGIC:
        if head.startswith(magic):
            return _DamageOnBadCompression(opener(prefixed)), True
    return prefixed, False


def _pax_fields(data: bytes, offset: int) -> dict[str, str]:
    """Records ``"<length> <key>=<value>\\n"`` of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        match = re.match(rb"(\d+) ", data[pos:pos + 32])
        if match is None or int(match.group(1)) <= len(match.group(0)):
            raise TarDamage(offset, "invalid pax header")
        length = int(match.group(1))
        key, _, value = data[pos + len(match.group(0)):pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8",
                                                                      "surrogateescape")
        pos += length
    return fields


def tar_members(stream: IO[bytes], offset: int = 0) -> Iterator[TarMember]:
    """Regular-file members of the tar in ``stream`` (which starts at tar byte ``offset``,
    a header boundary), in order; directories, links and global headers are passed over.

    Ends normally only at the end-of-archive marker followed by nothing but the zeros that
    pad the last record (:func:`_check_end`); otherwise raises :class:`TarDamage`: the
    stream ends at a header boundary or inside a header or a member's data, a header fails
    its checksum (a corrupt header mid-shard, or a file that is not a tar at all), or the
    zero block that looked like the marker is followed by more than that padding.
    """
    name_override: str | None = None
    size_override: int | None = None
    first_header: int | None = None  # where the headers of the coming member began
    while True:
        block = read_exact(stream, BLOCK)
        if not block:
            raise TarDamage(offset, "stream ends without the end-of-archive marker")
        if len(block) < BLOCK:
            raise TarDamage(offset, "stream ends inside a header")
        if block == _ZERO_BLOCK:
            _check_end(stream, offset)
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as err:
            raise TarDamage(offset, f"invalid tar header ({err})") from None
        header_at = offset if first_header is None else first_header
        offset += BLOCK
        size = info.size if size_override is None else size_override
        name = name_override or info.name
        data = read_exact(stream, size)
        if len(data) < size:
            raise TarDamage(offset + len(data), "stream ends inside a member's data",
                            member=name if info.type in _REGULAR else None)
        offset += size + len(read_exact(stream, -size % BLOCK))
        if info.type == tarfile.XHDTYPE:  # pax: applies to the next member
            fields = _pax_fields(data, header_at)
            name_override = fields.get("path", name_override)
            if "size" in fields:
                if not fields["size"].isdigit():
                    raise TarDamage(header_at, "invalid size in pax header")
                size_override = int(fields["size"])
            first_header = header_at
            continue
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            if info.type == tarfile.GNUTYPE_LONGNAME:
                name_override = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            first_header = header_at
            continue
        name_override = size_override = first_header = None
        if info.type in _REGULAR:
            yield TarMember(name, data, header_at, offset)


def _check_end(stream: IO[bytes], offset: int) -> None:
    """Raise :class:`TarDamage` unless the zero block at tar byte ``offset`` (a header
    position) is a real end-of-archive marker.

    A proper archive ends with two zero blocks and is then padded with zeros to a whole
    :data:`RECORD`, so it ends at the latest at the record boundary after those two blocks:
    at most ~10 KiB past the marker, read here (a healthy shard costs that, no more). More
    bytes than that are damage: zeros are what a preallocated file holds where an
    interrupted write never reached (the samples there are lost, not absent), and data is
    what follows a zeroed header mid-archive. Checking that the rest is zero would not do:
    the interrupted-write tail *is* zero. A writer that pads to a larger record (``tar -b
    64``) also fails this test; the caller may clear it with the shard's known sample count
    (``zero_tail``).
    """
    end = -(-(offset + 2 * BLOCK) // RECORD) * RECORD
    allowed = end - offset - BLOCK  # bytes after this block that may still be padding
    rest = read_exact(stream, allowed + 1)
    if rest.count(0) != len(rest):
        raise TarDamage(offset, "a zero block followed by tar data (a zeroed header?)")
    if len(rest) > allowed:
        raise TarDamage(offset, f"zeros run on past where a tar padded to {RECORD}-byte "
                        f"records ends (more than {allowed} bytes after this zero block: an "
                        f"interrupted write to a preallocated file?)", zero_tail=True)
