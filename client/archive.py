"""A zip read as it streams in, entry by entry, so that the images which arrived whole before a
connection dropped are kept and only the rest is fetched again (``GET /jobs/{id}/archive?since=``).

``zipfile`` needs the central directory at the end of the file, which a cut-off download never
has; this reads the local headers in order instead. The server streams the archive (zipstream-ng),
so an entry's sizes come after its data, in a data descriptor: the caller says how long an entry
is when it knows (``manifest.json``, which comes first, gives every image's bytes), and otherwise
the descriptor is found by its signature and accepted only when its CRC and size match the bytes
before it. Entries may be stored or deflated. Every entry's CRC is checked.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable, Iterator

LOCAL_HEADER = b"PK\x03\x04"
DATA_DESCRIPTOR = b"PK\x07\x08"
# What may follow the last entry: the central directory, or the end records of an empty zip.
ARCHIVE_END = (b"PK\x01\x02", b"PK\x06\x06", b"PK\x05\x05", b"PK\x05\x06")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name and extra lengths
STORED, DEFLATED = 0, 8
FLAG_ENCRYPTED, FLAG_DESCRIPTOR, FLAG_UTF8 = 0x1, 0x8, 0x800
ZIP64_EXTRA = 0x0001
ZIP64_MARK = 0xFFFFFFFF


class ArchiveError(Exception):
    """The bytes are not a zip this reader can follow."""


class Truncated(ArchiveError):
    """The stream ended in the middle of the archive (a dropped connection)."""


class _Buffer:
    """Bytes from an iterator of chunks, read and peeked at by length."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self.data = bytearray()

    def fill(self) -> bool:
        for chunk in self._chunks:
            if chunk:
                self.data += chunk
                return True
        return False

    def peek(self, size: int) -> bytes:
        while len(self.data) < size and self.fill():
            pass
        return bytes(self.data[:size])

    def read(self, size: int) -> bytes:
        while len(self.data) < size:
            if not self.fill():
                raise Truncated(f"the archive ended {size - len(self.data)} byte(s) short")
        out = bytes(self.data[:size])
        del self.data[:size]
        return out

    def drain(self) -> None:
        self.data.clear()
        for _ in self._chunks:
            pass


def entries(chunks: Iterable[bytes], size_of: Callable[[str], int | None] = lambda name: None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each entry, in order, as soon as it has arrived whole and its CRC
    matched. ``size_of(name)``: the entry's length when the caller knows it (asked after the
    entries before it were handled). Raises ``Truncated`` where the stream stops early."""
    buffer = _Buffer(chunks)
    while True:
        signature = buffer.peek(4)
        if signature in ARCHIVE_END:
            buffer.drain()  # the central directory: everything is in; read it to keep the connection
            return
        if signature != LOCAL_HEADER:
            if len(signature) < 4:
                raise Truncated("the archive ended before its central directory")
            raise ArchiveError(f"expected a zip entry, found bytes {signature!r}")
        yield _entry(buffer, size_of)


def _entry(buffer: _Buffer, size_of: Callable[[str], int | None]) -> tuple[str, bytes]:
    _, _, flags, method, _, _, crc, packed_size, size, name_length, extra_length = _LOCAL.unpack(buffer.read(_LOCAL.size))
    raw_name = buffer.read(name_length)
    name = raw_name.decode("utf-8" if flags & FLAG_UTF8 else "cp437")
    zip64, packed_size, size = _zip64_sizes(buffer.read(extra_length), packed_size, size)
    if flags & FLAG_ENCRYPTED:
        raise ArchiveError(f"{name} is encrypted")
    described = bool(flags & FLAG_DESCRIPTOR)
    if method == DEFLATED:
        data = _inflate(buffer, name)
        if described:
            crc = _descriptor(buffer, zip64)
    elif method == STORED:
        known = size if not described or size else size_of(name)
        if known is None:
            data, crc = _until_descriptor(buffer, name)
        else:
            data = buffer.read(known)
            if described:
                crc = _descriptor(buffer, zip64)
    else:
        raise ArchiveError(f"{name} is compressed with method {method}, which this client cannot read")
    if zlib.crc32(data) != crc:
        raise ArchiveError(f"{name} does not match its CRC: the archive is damaged")
    return name, data


def _zip64_sizes(extra: bytes, packed_size: int, size: int) -> tuple[bool, int, int]:
    """Whether the entry is zip64 (its data descriptor then has 8-byte sizes), and its sizes."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        field = extra[at + 4 : at + 4 + length]
        if kind == ZIP64_EXTRA:
            values = [struct.unpack_from("<Q", field, offset)[0] for offset in range(0, len(field) - 7, 8)]
            if size == ZIP64_MARK and values:
                size = values.pop(0)
            if packed_size == ZIP64_MARK and values:
                packed_size = values.pop(0)
            return True, packed_size, size
        at += 4 + length
    return False, packed_size, size


def _descriptor(buffer: _Buffer, zip64: bool) -> int:
    """Read the data descriptor after an entry's data (its signature is optional); its CRC."""
    if buffer.peek(4) == DATA_DESCRIPTOR:
        buffer.read(4)
    crc = struct.unpack("<I", buffer.read(4))[0]
    buffer.read(16 if zip64 else 8)
    return crc


def _until_descriptor(buffer: _Buffer, name: str) -> tuple[bytes, int]:
    """A stored entry of unknown length: its data runs up to the first data descriptor whose CRC
    and sizes describe exactly the bytes before it."""
    searched = 0
    while True:
        at = buffer.data.find(DATA_DESCRIPTOR, searched)
        if at < 0:
            searched = max(0, len(buffer.data) - 3)
            if not buffer.fill():
                raise Truncated(f"the archive ended inside {name}")
            continue
        if len(buffer.data) < at + 24 and buffer.fill():
            continue  # the descriptor's fields are not all in yet
        for sizes, length in (("<II", 8), ("<QQ", 16)):
            fields = buffer.data[at + 8 : at + 8 + length]
            if len(fields) < length:
                continue
            crc = struct.unpack_from("<I", buffer.data, at + 4)[0]
            if set(struct.unpack(sizes, fields)) == {at} and zlib.crc32(buffer.data[:at]) == crc:
                data = bytes(buffer.data[:at])
                del buffer.data[: at + 8 + length]
                return data, crc
        searched = at + 1


def _inflate(buffer: _Buffer, name: str) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts = []
    while not inflater.eof:
        if not buffer.data and not buffer.fill():
            raise Truncated(f"the archive ended inside {name}")
        try:
            parts.append(inflater.decompress(bytes(buffer.data)))
        except zlib.error as exc:
            raise ArchiveError(f"{name} cannot be inflated: {exc}") from None
        buffer.data = bytearray(inflater.unused_data)
    return b"".join(parts)
