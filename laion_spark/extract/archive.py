"""Record-by-record reading of WARC, WAT and ARC files, compressed or not, with damage detection.

fastwarc reads WARC/WAT (about twice as fast as warcio end to end, see bench/extract.py); warcio reads ARC
files, everything when ``extract.reader`` is ``warcio``, and re-reads a WARC that stopped fastwarc. Both readers
stop silently at a truncated gzip member, so :class:`TrackedStream` keeps the bytes of the record being read
(bounded) and :func:`iter_records` checks the end of the file itself, turning silent truncation into
:class:`DamagedArchive`.
"""

from __future__ import annotations

import collections
import datetime as dt
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

# The stream keeps the bytes from the start of the record being read, for the end-of-file check, up to this cap
# (Common Crawl truncates responses at 1 MiB; a larger last record is simply not checked).
TAIL_WINDOW_BYTES = 8 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024
_ARC_RECORD_LINE = re.compile(rb"^\S+ [0-9a-fA-F.:]+ \d{12,18} \S* ?-?\d+\s*$", re.MULTILINE)


# WAT records without this JSON value have no images (see wat.py); checking for it first skips most records.
WAT_IMAGE_MARKER = b'"IMG@/src"'


class NotAnArchive(ValueError):
    """The file is readable but is neither WARC (WAT) nor ARC."""


class DamagedArchive(OSError):
    """The file ends before its last record does, or has unreadable bytes after the last record read."""


@dataclass(slots=True)
class ArchiveRecord:
    """A record worth parsing: a WAT metadata record (JSON) or an HTML response."""

    source_format: str  # wat | warc | arc
    offset: int  # byte offset of the record (its gzip member) in the file as stored
    target_uri: str | None
    date: dt.datetime | None
    payload: bytes
    http_charset: str | None  # from the HTTP Content-Type header, for HTML


@dataclass
class ReadCounts:
    records_read: int = 0


class TrackedStream:
    """A read-only stream that counts bytes and keeps the bytes since the current record's start (at most about
    ``window``), for the end-of-file check. Memory stays bounded whatever the file's size."""

    def __init__(self, raw: BinaryIO, window: int = TAIL_WINDOW_BYTES):
        self._raw = raw
        self._window = window
        self._chunks: collections.deque[tuple[int, bytes]] = collections.deque()
        self._kept = 0
        self.position = 0
        self._pushback = b""

    def read(self, size: int = -1) -> bytes:
        if self._pushback:
            data, self._pushback = self._pushback, b""
            if size is not None and 0 <= size < len(data):
                data, self._pushback = data[:size], data[size:]
            return data
        data = self._raw.read(size if size is not None else -1)
        if data:
            self._chunks.append((self.position, data))
            self._kept += len(data)
            self.position += len(data)
            while self._kept - len(self._chunks[0][1]) >= self._window:
                self._kept -= len(self._chunks.popleft()[1])
        return data

    def readable(self) -> bool:
        return True

    def rewind(self) -> bool:
        """Start again from the first byte, if the underlying stream can seek."""
        try:
            if not self._raw.seekable():
                return False
            self._raw.seek(0)
        except (AttributeError, OSError, ValueError):
            return False
        self._chunks.clear()
        self._kept = 0
        self.position = 0
        self._pushback = b""
        return True

    def tell(self) -> int:
        return self.position - len(self._pushback)

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return getattr(self._raw, "closed", False)

    def peek_head(self, size: int) -> bytes:
        """Read ``size`` bytes from the start and push them back, for format sniffing."""
        assert self.position == 0 and not self._pushback
        data = b""
        while len(data) < size:
            chunk = self.read(size - len(data))
            if not chunk:
                break
            data += chunk
        self._pushback = data
        return data

    def forget_before(self, offset: int) -> None:
        """Drop kept chunks that end before ``offset`` (the start of the record being read)."""
        chunks = self._chunks
        while len(chunks) > 1 and chunks[0][0] + len(chunks[0][1]) <= offset:
            self._kept -= len(chunks.popleft()[1])

    def tail_from(self, offset: int) -> bytes | None:
        """Bytes from ``offset`` to what has been read so far, or None when ``offset`` left the window."""
        if not self._chunks or offset < self._chunks[0][0]:
            return None
        data = b"".join(chunk for _, chunk in self._chunks)
        return data[offset - self._chunks[0][0] :]


def sniff_format(head: bytes) -> tuple[str, bool]:
    """(``warc`` | ``arc``, gzipped) from the first bytes of a file; raises :class:`NotAnArchive`."""
    gzipped = head[:2] == b"\x1f\x8b"
    text = head
    if gzipped:
        try:
            text = zlib.decompressobj(47).decompress(head, _SNIFF_BYTES)
        except zlib.error as exc:
            raise NotAnArchive(f"gzip header is corrupt: {exc}") from None
    start = text.lstrip(b"\r\n\t ")
    if start.startswith(b"WARC/"):
        return "warc", gzipped
    if start.startswith(b"filedesc:") or _ARC_RECORD_LINE.match(start[:1024]):
        return "arc", gzipped
    preview = start[:40].decode("latin-1").encode("unicode_escape").decode("ascii")
    if not start:
        raise NotAnArchive("the file is empty")
    raise NotAnArchive(f"not a WARC, WAT or ARC archive (starts with {preview!r})")


def iter_records(stream: TrackedStream, reader: str, counts: ReadCounts) -> Iterator[ArchiveRecord]:
    """Yield the WAT metadata and HTML response records of one file, counting every record read.

    Raises :class:`NotAnArchive` before the first record, or an ``OSError`` (a :class:`DamagedArchive` for
    silent truncation) after the records that could be read: callers keep what was yielded.
    """
    head = stream.peek_head(_SNIFF_BYTES)
    archive_format, gzipped = sniff_format(head)
    check_warc_length = archive_format == "warc"
    if archive_format == "arc" or reader == "warcio":
        last_offset = yield from _iter_warcio(stream, archive_format, counts)
        _check_end_of_file(stream, last_offset, gzipped, check_warc_length)
        return
    yielded = [-1]
    try:
        last_offset = yield from _iter_fastwarc(stream, counts, yielded)
    except OSError as fastwarc_error:
        if reader != "auto" or not stream.rewind():
            raise
        # warcio tolerates some damage that stops fastwarc (e.g. a record not followed by its blank lines):
        # read the file again with it, yielding only the records after the last one already yielded.
        records_before = counts.records_read
        counts.records_read = 0
        try:
            last_offset = yield from _iter_warcio(stream, archive_format, counts, skip_through=yielded[0])
            _check_end_of_file(stream, last_offset, gzipped, check_warc_length)
        except Exception as warcio_error:
            counts.records_read = max(counts.records_read, records_before)
            raise DamagedArchive(f"{fastwarc_error} (warcio: {warcio_error})") from warcio_error
        counts.records_read = max(counts.records_read, records_before)
        return
    # Silent truncation is not something warcio reads past: no second reading for it.
    _check_end_of_file(stream, last_offset, gzipped, check_warc_length)


def _iter_fastwarc(stream: TrackedStream, counts: ReadCounts, yielded: list[int]) -> Iterator[ArchiveRecord]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    response, metadata = WarcRecordType.response, WarcRecordType.metadata
    last_offset = -1
    for record in ArchiveIterator(stream, parse_http=True, auto_decode="all"):
        counts.records_read += 1
        last_offset = record.stream_pos
        stream.forget_before(last_offset)
        record_type = record.record_type
        if record_type == metadata:
            # The image marker test comes before any header lookup: most WAT records fail it.
            payload = record.reader.read()
            if WAT_IMAGE_MARKER not in payload or "json" not in record.headers.get("Content-Type", ""):
                continue
            source_format = "wat"
            charset = None
        elif record_type == response:
            if not record.is_http or "html" not in (record.http_content_type or "html"):
                continue
            source_format = "warc"
            charset = record.http_charset
            payload = record.reader.read()
        else:
            continue
        yielded[0] = last_offset
        yield ArchiveRecord(
            source_format,
            last_offset,
            record.headers.get("WARC-Target-URI"),
            _utc_naive(record.record_date),
            payload,
            charset,
        )
    return last_offset


def _iter_warcio(
    stream: TrackedStream, archive_format: str, counts: ReadCounts, skip_through: int = -1
) -> Iterator[ArchiveRecord]:
    from warcio.archiveiterator import ArchiveIterator

    iterator = ArchiveIterator(stream, arc2warc=True)
    last_offset = -1
    for record in iterator:
        counts.records_read += 1
        source_format, charset = None, None
        if record.rec_type == "metadata":
            if "json" in (record.rec_headers.get_header("Content-Type") or ""):
                source_format = "wat"
        elif record.rec_type == "response" and record.http_headers is not None:
            content_type = record.http_headers.get_header("Content-Type") or "text/html"
            if "html" in content_type.lower():
                source_format = "arc" if archive_format == "arc" else "warc"
                charset = _charset_from_content_type(content_type)
        payload = record.content_stream().read() if source_format else b""
        # warcio knows a record's offset only once it has been read to its end.
        last_offset = iterator.get_record_offset()
        stream.forget_before(last_offset)
        if source_format and last_offset > skip_through:
            yield ArchiveRecord(
                source_format,
                last_offset,
                record.rec_headers.get_header("WARC-Target-URI"),
                _parse_warc_date(record.rec_headers.get_header("WARC-Date")),
                payload,
                charset,
            )
    return last_offset


def _check_end_of_file(stream: TrackedStream, last_offset: int, gzipped: bool, check_warc_length: bool) -> None:
    if stream.read(1):
        raise DamagedArchive(
            f"unreadable data after the last readable record (reader stopped at byte {stream.tell() - 1:,})"
        )
    if last_offset < 0:
        if stream.position:
            raise DamagedArchive("no record could be read")
        return
    tail = stream.tail_from(last_offset)
    # Unverifiable: the last record is larger than the window, or the file is one gzip stream rather than a
    # member per record (the reader then reports offsets inside it, where no member starts).
    if not tail or (gzipped and tail[:2] != b"\x1f\x8b"):
        return
    if gzipped:
        tail = _gunzip_members(tail, last_offset)
    if check_warc_length:
        _check_last_warc_record(tail, last_offset)


def _gunzip_members(data: bytes, offset: int) -> bytes:
    out = []
    while data:
        if data.strip(b"\x00") == b"":
            break  # zero padding after the last member is harmless
        member = zlib.decompressobj(31)
        try:
            out.append(member.decompress(data))
        except zlib.error as exc:
            raise DamagedArchive(f"corrupt gzip member at byte {offset:,}: {exc}") from None
        if not member.eof:
            raise DamagedArchive(f"truncated gzip: the member at byte {offset:,} ends before its end of stream")
        offset += len(data) - len(member.unused_data)
        data = member.unused_data
    return b"".join(out)


def _check_last_warc_record(data: bytes, offset: int) -> None:
    """Walk the records of the tail by their Content-Length; the last one must be complete."""
    position = 0
    while data[position:].strip(b"\r\n\x00"):
        while data[position : position + 1] in (b"\r", b"\n"):
            position += 1
        header_end = data.find(b"\r\n\r\n", position)
        if header_end < 0:
            raise DamagedArchive(f"truncated record at byte {offset + position:,}: its WARC header never ends")
        match = re.search(rb"(?im)^content-length:[ \t]*(\d+)", data[position:header_end])
        if not match:
            return  # not a header we can follow; the reader accepted it, so do not second-guess
        content_end = header_end + 4 + int(match.group(1))
        if len(data) < content_end:
            raise DamagedArchive(
                f"truncated record at byte {offset + position:,}: {len(data) - header_end - 4:,} of "
                f"{int(match.group(1)):,} content bytes present"
            )
        position = content_end


def _utc_naive(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return value


def _parse_warc_date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        return _utc_naive(dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
    except ValueError:
        return None


def _charset_from_content_type(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None
