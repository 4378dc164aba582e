"""Test archives written with warcio: WARC pages, WAT metadata records, ARC files, and damaged variants."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

CRAWL_DATE = "2024-03-01T12:00:00Z"


@dataclass
class HtmlPage:
    url: str
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    date: str = CRAWL_DATE


@dataclass
class WatPage:
    url: str
    images: list[tuple[str, str | None]]  # (src as written in the page, alt or None)
    base: str | None = None
    other_links: list[dict] = field(default_factory=lambda: [{"path": "A@/href", "url": "/about", "text": "About"}])
    date: str = CRAWL_DATE


def html_page(url: str, body: str, charset: str = "utf-8", content_type: str | None = None) -> HtmlPage:
    encoded = body.encode(charset)
    return HtmlPage(url, encoded, content_type if content_type is not None else f"text/html; charset={charset}")


def write_warc(path: Path, pages: list[HtmlPage], gzip_members: bool | None = None) -> Path:
    """A WARC with a request and a response record per page (gzip per record when the name ends in .gz)."""
    compress = path.name.endswith(".gz") if gzip_members is None else gzip_members
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=compress)
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "laion_spark tests"}))
        for page in pages:
            request = writer.create_warc_record(
                page.url,
                "request",
                payload=io.BytesIO(b""),
                http_headers=StatusAndHeaders(f"GET {page.url} HTTP/1.1", [("Host", "example")], is_http_request=True),
                warc_headers_dict={"WARC-Date": page.date},
            )
            writer.write_record(request)
            headers = [("Content-Length", str(len(page.body)))]
            if page.content_type:
                headers.insert(0, ("Content-Type", page.content_type))
            response = writer.create_warc_record(
                page.url,
                "response",
                payload=io.BytesIO(page.body),
                http_headers=StatusAndHeaders("200 OK", headers, protocol="HTTP/1.1"),
                warc_headers_dict={"WARC-Date": page.date},
            )
            writer.write_record(response)
    return path


@dataclass
class ArchivedResponse:
    """One HTTP response as a crawler stored it: an image, an error page, anything with a status and headers."""

    url: str  # WARC-Target-URI, written as it is (not normalised)
    body: bytes
    status_line: str = "200 OK"
    headers: list[tuple[str, str]] = field(default_factory=lambda: [("Content-Type", "image/jpeg")])
    date: str = CRAWL_DATE


def write_responses(path: Path, responses: list[ArchivedResponse], gzip_members: bool | None = None) -> Path:
    """A WARC of ``response`` records only (gzip per record when the name ends in .gz), in the order given."""
    compress = path.name.endswith(".gz") if gzip_members is None else gzip_members
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=compress)
        for response in responses:
            headers = [*response.headers, ("Content-Length", str(len(response.body)))]
            record = writer.create_warc_record(
                response.url,
                "response",
                payload=io.BytesIO(response.body),
                http_headers=StatusAndHeaders(response.status_line, headers, protocol="HTTP/1.1"),
                warc_headers_dict={"WARC-Date": response.date},
            )
            writer.write_record(record)
    return path


def wat_json(page: WatPage) -> dict:
    links = [dict(link) for link in page.other_links]
    for src, alt in page.images:
        link = {"path": "IMG@/src", "url": src}
        if alt is not None:
            link["alt"] = alt
        links.append(link)
    head = {"Title": "a page", "Metas": [{"name": "viewport", "content": "width=device-width"}]}
    if page.base is not None:
        head["Base"] = page.base
    return {
        "Container": {"Filename": "test.warc.gz", "Compressed": True, "Offset": "0"},
        "Envelope": {
            "Format": "WARC",
            "WARC-Header-Length": "500",
            "WARC-Header-Metadata": {"WARC-Type": "response", "WARC-Target-URI": page.url, "WARC-Date": page.date},
            "Payload-Metadata": {
                "Actual-Content-Type": "application/http; msgtype=response",
                "HTTP-Response-Metadata": {
                    "Response-Message": {"Status": "200", "Version": "HTTP/1.1", "Reason": "OK"},
                    "Headers": {"Content-Type": "text/html"},
                    "HTML-Metadata": {"Head": head, "Links": links},
                },
            },
        },
    }


def write_wat(path: Path, pages: list[WatPage | bytes], gzip_members: bool | None = None) -> Path:
    """A WAT: per page a request metadata record (no images) and a response metadata record.

    A ``bytes`` entry is written verbatim as the JSON payload of one response metadata record (for corrupt or
    non-UTF-8 payloads).
    """
    compress = path.name.endswith(".gz") if gzip_members is None else gzip_members
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=compress)
        writer.write_record(writer.create_warcinfo_record(path.name, {"format": "WARC File Format 1.0"}))
        for i, page in enumerate(pages):
            url = page.url if isinstance(page, WatPage) else f"http://broken.example/{i}"
            date = page.date if isinstance(page, WatPage) else CRAWL_DATE
            request_meta = {"Envelope": {"WARC-Header-Metadata": {"WARC-Type": "request", "WARC-Target-URI": url}}}
            payload = json.dumps(wat_json(page)).encode() if isinstance(page, WatPage) else page
            for body in (json.dumps(request_meta).encode(), payload):
                record = writer.create_warc_record(
                    url,
                    "metadata",
                    payload=io.BytesIO(body),
                    warc_headers_dict={"WARC-Date": date, "Content-Type": "application/json"},
                )
                writer.write_record(record)
    return path


def write_arc(path: Path, pages: list[HtmlPage]) -> Path:
    """An ARC v1 file (the pre-WARC format of the Internet Archive), gzip per record when named .gz."""
    compress = path.name.endswith(".gz")
    version_block = b"1 0 LAION test\nURL IP-address Archive-date Content-type Archive-length\n"
    records = [(f"filedesc://{path.name} 0.0.0.0 20240301120000 text/plain", version_block)]
    for page in pages:
        http = (
            b"HTTP/1.1 200 OK\r\nContent-Type: "
            + page.content_type.encode()
            + b"\r\nContent-Length: "
            + str(len(page.body)).encode()
            + b"\r\n\r\n"
            + page.body
        )
        date = dt.datetime.fromisoformat(page.date.replace("Z", "+00:00")).strftime("%Y%m%d%H%M%S")
        records.append((f"{page.url} 93.184.216.34 {date} text/html", http))
    with open(path, "wb") as out:
        for header, body in records:
            data = f"{header} {len(body)}\n".encode() + body + b"\n"
            out.write(gzip.compress(data) if compress else data)
    return path


def truncate(path: Path, keep_fraction: float, out: Path) -> Path:
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * keep_fraction)])
    return out
