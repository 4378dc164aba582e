"""Record-by-record reading of WARC, WAT and ARC files, compressed or not, with damage detection.

fastwarc reads WARC/WAT (about twice as fast as warcio end to end, see bench/extract.py); warcio reads ARC
files, everything when ``extract.reader`` is ``warcio``, and re-reads a WARC that stopped fastwarc. Both readers
stop silently at a truncated gzip member, so :class:`TrackedStream` keeps the bytes of the record being read
(bounded) and :func:`iter_records` checks the end of the file itself, turning silent truncation into
:class:`DamagedArchive`.

Older crawls (WARC/0.18, the ClueWeb era) end HTTP header lines with a bare LF. fastwarc knows only CRLF, so it
takes everything up to the first CRLF blank line of the page for headers: the charset and the first ``<img>`` tags
vanish with it. Such a record is recognised from fastwarc's parsed head (a bare LF or markup in it) and split again
here, from the exact bytes fastwarc read (:func:`split_http_response`, which ends a head at the first blank line of
either kind, as warcio does). The check adds about 2 % to a WARC's extraction time; parsing every head in Python
added 6 to 10 % (measured on generated pages like bench/extract.py's).
"""

from __future__ import annotations

import collections
import datetime as dt
import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

# The stream keeps the bytes from the start of the record being read, for the end-of-file check, up to this cap
# (Common Crawl truncates responses at 1 MiB; a larger last record is simply not checked).
TAIL_WINDOW_BYTES = 8 * 1024 * 1024
_SNIFF_BYTES = 64 * 1024
_ARC_RECORD_LINE = re.compile(rb"^\S+ [0-9a-fA-F.:]+ \d{12,18} \S* ?-?\d+\s*$", re.MULTILINE)


# WAT records without this JSON value have no images (see wat.py); checking for it first skips most records.
WAT_IMAGE_MARKER = b'"IMG@/src"'

# What iter_records yields: extraction's WAT metadata records and HTML responses, or the responses that may hold
# an image (archive-mode download).
PAGE_RECORDS = "pages"
IMAGE_RECORDS = "images"
RECORD_KINDS = (PAGE_RECORDS, IMAGE_RECORDS)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")

# The HTTP head ends at the first empty line, CRLF or bare LF.
_HEAD_END = re.compile(rb"\n\r?\n")
# What fastwarc reads as a head: a bare-LF head runs on to the first CRLF blank line in the page, or to the end of
# the record, and fastwarc's default limit (32 KiB) would stop the whole file there.
FASTWARC_MAX_HEAD_BYTES = TAIL_WINDOW_BYTES
# Signs that fastwarc's head holds part of the page: a line of markup, or a tag no header value contains.
_MARKUP_IN_HEAD = re.compile(r"^<|<(?:!doctype|html|head|meta|title|body|img|script|style|div|table)\b", re.I | re.M)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# A decompressed body stops here: no page or image is this large, but a gzip bomb is.
MAX_DECODED_BODY_BYTES = 256 * 1024 * 1024


class NotAnArchive(ValueError):
    """The file is readable but is neither WARC (WAT) nor ARC."""


class DamagedArchive(OSError):
    """The file ends before its last record does, or has unreadable bytes after the last record read."""


@dataclass(slots=True)
class ArchiveRecord:
    """A record worth parsing: a WAT metadata record (JSON), an HTML response, or a response that may be an image.

    For responses, ``payload`` is the HTTP body with its transfer and content encodings undone. ``http_status``
    and ``http_headers`` are filled for ``IMAGE_RECORDS`` only (extraction needs no more than the charset).
    """

    source_format: str  # wat | warc | arc
    offset: int  # byte offset of the record (its gzip member) in the file as stored
    target_uri: str | None
    date: dt.datetime | None
    payload: bytes
    http_charset: str | None  # from the HTTP Content-Type header, for HTML
    http_status: int | None = None
    http_headers: list[tuple[str, str]] = field(default_factory=list)

    def http_header(self, name: str) -> str | None:
        return _first_header(self.http_headers, name)

    def http_header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.http_headers if key.lower() == name]


@dataclass
class ReadCounts:
    records_read: int = 0
    http_heads_reparsed: int = 0  # responses whose HTTP head fastwarc misread (bare-LF lines), split again here


@dataclass(slots=True)
class HttpHead:
    status: int | None
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        return _first_header(self.headers, name)


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


def sniff_stream(stream: TrackedStream) -> tuple[str, bool]:
    """:func:`sniff_format` on the first bytes of ``stream``, which are pushed back for the reader."""
    return sniff_format(stream.peek_head(_SNIFF_BYTES))


def iter_records(
    stream: TrackedStream, reader: str, counts: ReadCounts, kind: str = PAGE_RECORDS
) -> Iterator[ArchiveRecord]:
    """Yield the records of one file that ``kind`` asks for, counting every record read.

    ``PAGE_RECORDS``: WAT metadata records with images, and HTML responses. ``IMAGE_RECORDS``: responses that may
    hold an image (typed ``image/*``, untyped, or named like an image file), whatever their HTTP status.
    Raises :class:`NotAnArchive` before the first record, or an ``OSError`` (a :class:`DamagedArchive` for
    silent truncation) after the records that could be read: callers keep what was yielded.
    """
    if kind not in RECORD_KINDS:
        raise ValueError(f"record kind must be one of {RECORD_KINDS}, got {kind!r}")
    archive_format, gzipped = sniff_stream(stream)
    check_warc_length = archive_format == "warc"
    if archive_format == "arc" or reader == "warcio":
        last_offset = yield from _iter_warcio(stream, archive_format, counts, kind)
        _check_end_of_file(stream, last_offset, gzipped, check_warc_length)
        return
    yielded = [-1]
    try:
        last_offset = yield from _iter_fastwarc(stream, counts, yielded, kind)
    except OSError as fastwarc_error:
        if reader != "auto" or not stream.rewind():
            raise
        # warcio tolerates some damage that stops fastwarc (e.g. a record not followed by its blank lines):
        # read the file again with it, yielding only the records after the last one already yielded.
        records_before = counts.records_read
        counts.records_read = 0
        try:
            last_offset = yield from _iter_warcio(stream, archive_format, counts, kind, skip_through=yielded[0])
            _check_end_of_file(stream, last_offset, gzipped, check_warc_length)
        except Exception as warcio_error:
            counts.records_read = max(counts.records_read, records_before)
            raise DamagedArchive(f"{fastwarc_error} (warcio: {warcio_error})") from warcio_error
        counts.records_read = max(counts.records_read, records_before)
        return
    # Silent truncation is not something warcio reads past: no second reading for it.
    _check_end_of_file(stream, last_offset, gzipped, check_warc_length)


def _iter_fastwarc(stream: TrackedStream, counts: ReadCounts, yielded: list[int], kind: str) -> Iterator[ArchiveRecord]:
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    response, metadata = WarcRecordType.response, WarcRecordType.metadata
    want_pages = kind == PAGE_RECORDS
    last_offset = -1
    # auto_decode="none": the bytes fastwarc hands back are then exactly the record's, so a misread head can be
    # split again; the few encoded bodies (Common Crawl stores them decoded) are decoded here instead.
    records = ArchiveIterator(stream, parse_http=True, auto_decode="none", max_header_len=FASTWARC_MAX_HEAD_BYTES)
    for record in records:
        counts.records_read += 1
        last_offset = record.stream_pos
        stream.forget_before(last_offset)
        record_type = record.record_type
        if record_type == metadata:
            if not want_pages:
                continue
            # The image marker test comes before any header lookup: most WAT records fail it.
            payload = record.reader.read()
            if WAT_IMAGE_MARKER not in payload or "json" not in record.headers.get("Content-Type", ""):
                continue
            found = ArchiveRecord("wat", last_offset, *_fastwarc_uri_and_date(record), payload, None)
        elif record_type == response and record.is_http:
            # A misread head never makes a page look like another type: it loses the Content-Type (then taken
            # for HTML) or keeps the real one's start. So the cheap type test comes first.
            if want_pages and "html" not in (record.http_content_type or "html"):
                continue
            found = _fastwarc_response(record, last_offset, want_pages, counts)
            if found is None:
                continue
        else:
            continue
        yielded[0] = last_offset
        yield found
    return last_offset


def _fastwarc_response(record, offset: int, want_pages: bool, counts: ReadCounts) -> ArchiveRecord | None:
    """The HTML page (``want_pages``) or the possible image in a fastwarc response record, or None."""
    http = record.http_headers
    head_text = str(http)
    if _fastwarc_misread_head(head_text):
        counts.http_heads_reparsed += 1
        return _response_split_again(record, offset, _bytes_of(http), want_pages)
    if want_pages:
        charset, status, headers = record.http_charset, None, []
    elif looks_like_image(record.headers.get("WARC-Target-URI"), http.get("Content-Type")):
        charset, status, headers = None, http.status_code, list(http.astuples())
    else:
        return None
    body = record.reader.read()
    if not want_pages and len(body) < record.content_length:
        return None  # the end of the file cut this image short: these bytes are not the image
    # Two header lookups cost more than this scan of the head, and most bodies are not encoded.
    lowered = head_text.lower()
    if "\ntransfer-encoding" in lowered or "\ncontent-encoding" in lowered:
        body = decode_http_body(body, http.get("Transfer-Encoding"), http.get("Content-Encoding"))
    return ArchiveRecord("warc", offset, *_fastwarc_uri_and_date(record), body, charset, status, headers)


def _response_split_again(record, offset: int, head_bytes: bytes, want_pages: bool) -> ArchiveRecord | None:
    """A response whose HTTP head fastwarc misread, split again from the exact bytes it read."""
    rest = record.reader.read()
    block = head_bytes + rest
    head, body_start = split_http_response(block)
    content_type = head.get("Content-Type")
    if want_pages:
        if not is_html(content_type):
            return None
        charset, status, headers = _charset_from_content_type(content_type or ""), None, []
    elif looks_like_image(record.headers.get("WARC-Target-URI"), content_type):
        if len(rest) < record.content_length:
            return None  # cut short by the end of the file
        charset, status, headers = None, head.status, head.headers
    else:
        return None
    body = decode_http_body(block[body_start:], head.get("Transfer-Encoding"), head.get("Content-Encoding"))
    return ArchiveRecord("warc", offset, *_fastwarc_uri_and_date(record), body, charset, status, headers)


def _fastwarc_uri_and_date(record) -> tuple[str | None, dt.datetime | None]:
    return record.headers.get("WARC-Target-URI"), _utc_naive(record.record_date)


def _iter_warcio(
    stream: TrackedStream, archive_format: str, counts: ReadCounts, kind: str, skip_through: int = -1
) -> Iterator[ArchiveRecord]:
    from warcio.archiveiterator import ArchiveIterator

    want_pages = kind == PAGE_RECORDS
    iterator = ArchiveIterator(stream, arc2warc=True)
    last_offset = -1
    for record in iterator:
        counts.records_read += 1
        source_format, charset, http_headers = None, None, record.http_headers
        if record.rec_type == "metadata":
            if want_pages and "json" in (record.rec_headers.get_header("Content-Type") or ""):
                source_format = "wat"
        elif record.rec_type == "response" and http_headers is not None:
            content_type = http_headers.get_header("Content-Type")
            if want_pages:
                if is_html(content_type):
                    source_format = "arc" if archive_format == "arc" else "warc"
                    charset = _charset_from_content_type(content_type) if content_type else None
            elif looks_like_image(record.rec_headers.get_header("WARC-Target-URI"), content_type):
                source_format = "arc" if archive_format == "arc" else "warc"
        payload = record.content_stream().read() if source_format else b""
        if source_format and not want_pages and getattr(record.raw_stream, "limit", 0) > 0:
            source_format = None  # the end of the file cut this image short: these bytes are not the image
        # warcio knows a record's offset only once it has been read to its end.
        last_offset = iterator.get_record_offset()
        stream.forget_before(last_offset)
        if source_format and last_offset > skip_through:
            status, headers = None, []
            if not want_pages:
                code = http_headers.get_statuscode()
                status = int(code) if code and code.isdigit() else None
                headers = list(http_headers.headers)
            yield ArchiveRecord(
                source_format,
                last_offset,
                record.rec_headers.get_header("WARC-Target-URI"),
                _parse_warc_date(record.rec_headers.get_header("WARC-Date")),
                payload,
                charset,
                status,
                headers,
            )
    return last_offset


def is_html(content_type: str | None) -> bool:
    """A response worth parsing for ``<img>`` tags: typed as HTML (XHTML included), or not typed at all."""
    if not content_type:
        return True
    return "html" in content_type.split(";", 1)[0].lower()


def looks_like_image(url: str | None, content_type: str | None) -> bool:
    """Skip pages, scripts and styles; keep anything typed as an image, untyped, or named like one."""
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind.startswith("image/") or kind in ("", "application/octet-stream", "binary/octet-stream"):
        return True
    return (url or "").strip("<> ").split("?", 1)[0].lower().endswith(IMAGE_EXTENSIONS)


def split_http_response(block: bytes) -> tuple[HttpHead, int]:
    """The HTTP head at the start of a response record's block, and the offset of the body in it.

    The head ends at the first empty line, ``\\r\\n`` or bare ``\\n`` (warcio's rule), or earlier at a line of
    markup: a server that sent its page without the blank line. Lines that are not ``Name: value`` are dropped,
    as warcio and fastwarc drop them.
    """
    match = _HEAD_END.search(block, 0, FASTWARC_MAX_HEAD_BYTES)
    head_end, body_start = (match.start(), match.end()) if match is not None else (len(block), len(block))
    lines = block[:head_end].decode("latin-1").split("\n")
    offset = 0
    for number, line in enumerate(lines):
        if line[:1] == "<":
            lines, body_start = lines[:number], offset
            break
        offset += len(line) + 1
    lines = [line.removesuffix("\r") for line in lines]
    parts = lines[0].split(None, 2) if lines else []
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}".strip())
            continue
        name, colon, value = line.partition(":")
        name = name.rstrip(" \t")
        if colon and _HEADER_NAME.fullmatch(name):
            headers.append((name, value.strip()))
    return HttpHead(status, headers), body_start


def decode_http_body(body: bytes, transfer_encoding: str | None, content_encoding: str | None) -> bytes:
    """``body`` with its chunked transfer encoding and gzip, deflate or brotli content encoding undone.

    Damage keeps what could be decoded (a truncated record), and a body that is not what its header claims is
    returned as it is.
    """
    if transfer_encoding and "chunked" in transfer_encoding.lower():
        body = _dechunk(body)
    encoding = (content_encoding or "").strip().lower()
    if encoding and encoding != "identity":
        body = _decompress(body, encoding)
    return body


def _fastwarc_misread_head(head: str) -> bool:
    """Whether fastwarc's head (as it prints it) holds a bare LF or part of the page."""
    return head.count("\n") != head.count("\r\n") or ("<" in head and _MARKUP_IN_HEAD.search(head) is not None)


def _bytes_of(http_headers) -> bytes:
    """The bytes fastwarc read for a head, exactly: ``HeaderMap.write`` gives them back as they came."""
    buffer = io.BytesIO()
    http_headers.write(buffer)
    return buffer.getvalue()


def _dechunk(data: bytes) -> bytes:
    chunks = []
    position = 0
    while position < len(data):
        line_end = data.find(b"\n", position)
        if line_end < 0:
            break
        try:
            size = int(data[position:line_end].split(b";", 1)[0].strip(), 16)
        except ValueError:
            if not chunks:
                return data  # not chunked after all
            chunks.append(data[position:])  # keep the bytes rather than guess
            break
        if size <= 0:
            break
        start = line_end + 1
        chunks.append(data[start : start + size])
        position = start + size
        position += 2 if data.startswith(b"\r\n", position) else 1 if data.startswith(b"\n", position) else 0
    return b"".join(chunks)


def _decompress(data: bytes, encoding: str) -> bytes:
    if encoding == "br":
        import brotli

        try:
            return brotli.Decompressor().process(data)
        except brotli.error:
            return data
    if encoding in ("gzip", "x-gzip"):
        attempts = (47,)  # gzip or zlib header, detected
    elif encoding == "deflate":
        attempts = (15, -15)  # zlib-wrapped as the RFC says, or raw deflate as some servers send it
    else:
        return data
    for wbits in attempts:
        try:
            return zlib.decompressobj(wbits).decompress(data, MAX_DECODED_BODY_BYTES)
        except zlib.error:
            continue
    return data


def _first_header(headers: list[tuple[str, str]], name: str) -> str | None:
    name = name.lower()
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


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
