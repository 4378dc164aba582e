"""Image URL rules: resolve against the page, keep http(s) only, and normalise for a stable ``uid``."""

from __future__ import annotations

import hashlib
import re
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

from laion_spark.extract.text import normalize_text

_DEFAULT_PORTS = {"http": "80", "https": "443"}
# The WHATWG URL parser strips these before parsing; pages carry them from pretty-printed HTML.
_STRIPPED = str.maketrans("", "", "\t\n\r")
_ABSOLUTE_HTTP = re.compile(r"https?://")
# Already in normal form: lower-case http(s) scheme and host, no port, userinfo, fragment or whitespace.
_ALREADY_NORMAL = re.compile(r"https?://[a-z0-9.\-]+(?:[/?][^\s#]*)?\Z")
_HAS_PATH = re.compile(r"https?://[^/?]+[/?]")


def clean_target_uri(uri: str | None) -> str:
    """A WARC-Target-URI as written by wget (``<http://...>``) or with stray spaces, made usable."""
    if not uri:
        return ""
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1]
    return uri


def resolve_url(src: str, page_url: str, base_href: str | None = None) -> str:
    """``src`` made absolute: against ``<base href>`` (itself resolved against the page), else the page URL."""
    return PageUrlResolver(page_url, base_href).resolve(src)


class PageUrlResolver:
    """Resolves the image URLs of one page: the base is worked out once, and the common shapes of ``src``
    (absolute, host-relative, protocol-relative) skip ``urljoin``, which dominates extraction time otherwise."""

    __slots__ = ("base", "scheme", "origin")

    def __init__(self, page_url: str, base_href: str | None = None):
        base = page_url
        if base_href:
            try:
                base = urljoin(page_url, base_href.strip().translate(_STRIPPED))
            except ValueError:
                base = page_url
        self.base = base
        scheme, sep, rest = base.partition("://")
        self.scheme = scheme.lower() if sep else ""
        host_end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
        self.origin = f"{self.scheme}://{rest[:host_end]}" if sep else ""

    def resolve(self, src: str) -> str:
        src = src.strip()
        if "\n" in src or "\t" in src or "\r" in src:
            src = src.translate(_STRIPPED)
        if _ABSOLUTE_HTTP.match(src):
            return src  # urljoin returns an absolute URL unchanged too
        if self.origin and "/." not in src:
            if src.startswith("//"):
                return self.scheme + ":" + src
            if src.startswith("/"):
                return self.origin + src
        if not self.base:
            return src
        try:
            return urljoin(self.base, src)
        except ValueError:  # e.g. an invalid IPv6 literal
            return src


def normalize_url(url: str) -> str:
    """Lower-case scheme and host, drop the default port, the fragment and surrounding spaces; encode spaces.

    The result still fetches the same resource, so it is what the ``pairs`` table stores.
    """
    if _ALREADY_NORMAL.match(url):
        return url if _HAS_PATH.match(url) else url + "/"
    url = url.strip().translate(_STRIPPED)
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.replace(" ", "%20")
    scheme = parts.scheme.lower()
    netloc = parts.netloc
    if netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        host, sep, port = hostport.rpartition(":") if not hostport.endswith("]") else (hostport, "", "")
        if not sep:
            host, port = hostport, ""
        if port and _DEFAULT_PORTS.get(scheme) == port:
            port = ""
        netloc = (userinfo + "@" if userinfo else "") + host.lower() + (":" + port if port else "")
    path = parts.path.replace(" ", "%20") or ("/" if netloc else "")
    query = parts.query.replace(" ", "%20")
    return urlunsplit(SplitResult(scheme, netloc, path, query, ""))


def has_allowed_scheme(url: str, allowed_schemes: frozenset[str] | set[str]) -> bool:
    """True for absolute URLs with a host whose scheme is allowed (LAION keeps http and https only)."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme.lower() not in allowed_schemes:
        return False
    return rest.startswith("//") and len(rest) > 2


def allowed_image_url(url: str, allowed_schemes: frozenset[str] | set[str]) -> str | None:
    """``url`` normalised, or None when its scheme is not allowed (LAION keeps http and https only)."""
    if _ALREADY_NORMAL.match(url):  # the common case, without splitting the URL
        if url[4] == ":" and "http" in allowed_schemes or url[4] == "s" and "https" in allowed_schemes:
            return url if _HAS_PATH.match(url) else url + "/"
        return None
    if not has_allowed_scheme(url, allowed_schemes):
        return None
    return normalize_url(url)


def pair_uid(url: str, text: str) -> str:
    """The stable id of a pair: sha1 hex of the normalised URL, a tab, and the normalised text."""
    key = normalize_url(url) + "\t" + normalize_text(text)
    return hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()
