"""The Creative Commons licence a page declares, in LAION's short form (``by-sa/4.0``, ``cc0``), or None.

LAION-400M's ``LICENSE`` column held the CC licence found on the page, or ``"?"``; ours holds the short form or
null. A page states its licence with ``rel="license"`` on an ``<a>``, ``<area>`` or ``<link>`` (the microformat
that Creative Commons' licence chooser writes), and otherwise often just links to the licence deed from its footer.
So the links with ``rel="license"`` decide first: the first of them that points at a CC licence is the page's
licence, and when they point elsewhere (a site's own terms) the page has told us its licence and it is not CC, so
the result is None. Only a page with no ``rel="license"`` link at all falls back to its first plain link to a CC
licence URL.

The short form is the licence's elements and version; a jurisdiction port (``/licenses/by/2.0/fr/``) is dropped,
as LAION's short form drops it: a port is the same licence type and version adapted to one country's law, and what
a dataset user filters on is the type (commercial use, derivatives) and version. The public domain tools have no
version in it: ``/publicdomain/zero/1.0/`` is ``cc0``, ``/publicdomain/mark/1.0/`` is ``pdm``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

# Enough of the host to find a page that may link to a licence, before parsing it: a byte search, which the
# capitalisations seen in practice (creativecommons.org, CreativeCommons.org) pass, and a second one for the
# all-capitals spelling of old pages. A case-insensitive regex over the page cost a third of the HTML parse; these
# cost about 2 % of it (a 70 KB page).
CC_HOST_MARKER = b"ommons.org"
CC_HOST_MARKER_CAPITALS = b"OMMONS.ORG"

_CC_HOSTS = frozenset({"creativecommons.org", "www.creativecommons.org"})
# Licence elements as CC's URLs spell them (by-nc-sa, by-nd-nc of the 1.0 licences, sa alone), and the retired
# Sampling and Developing Nations licences, which also live under /licenses/.
_LICENSE_TYPE = re.compile(r"(?:by|sa|nc|nd)(?:-(?:by|sa|nc|nd))*|(?:nc-)?sampling\+?|devnations")
_VERSION = re.compile(r"\d+(?:\.\d+)*")
_PUBLIC_DOMAIN_TOOLS = {"zero": "cc0", "mark": "pdm"}


def may_link_cc_license(data: bytes) -> bool:
    """False when ``data`` (a page, a WAT record) names no creativecommons.org URL, so has no CC licence link."""
    return CC_HOST_MARKER in data or CC_HOST_MARKER_CAPITALS in data


def normalize_cc_license(url: str | None) -> str | None:
    """The short form of a creativecommons.org licence URL, or None for any other URL.

    ``https://creativecommons.org/licenses/by-sa/4.0/deed.en`` -> ``by-sa/4.0``;
    ``http://www.creativecommons.org/licenses/by/2.0/fr/legalcode`` -> ``by/2.0``;
    ``//creativecommons.org/publicdomain/zero/1.0/`` -> ``cc0``. Scheme (http, https or none), ``www.``, letter
    case, a port, a query or fragment, and what follows the version (jurisdiction, ``deed.xx``, ``legalcode``,
    ``rdf``) do not matter. A relative URL is not a licence URL, even one whose path looks like it.
    """
    if type(url) is not str:
        return None
    url = url.strip().lower()
    if "creativecommons.org" not in url:  # most links of a page; urlsplit costs more than this test
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed netloc (an unclosed IPv6 bracket, a bad port)
        return None
    if host not in _CC_HOSTS or parts.scheme not in ("http", "https", ""):
        return None
    segments = [segment for segment in parts.path.split("/") if segment]
    if len(segments) < 2:
        return None
    kind, name = segments[0], segments[1]
    if kind == "publicdomain":
        return _PUBLIC_DOMAIN_TOOLS.get(name)
    if kind != "licenses" or not _LICENSE_TYPE.fullmatch(name):
        return None
    if len(segments) > 2 and _VERSION.fullmatch(segments[2]):
        return f"{name}/{segments[2]}"
    return name


def is_license_rel(rel: str | None) -> bool:
    """Whether a ``rel`` attribute holds the ``license`` link type (tokens split on whitespace, any case), or an
    RDFa name for it such as ``cc:license``."""
    if not rel:
        return False
    return any(token == "license" or token.endswith(":license") for token in rel.lower().split())


def page_license(links: Iterable[tuple[str | None, str | None]]) -> str | None:
    """The page's CC licence from its links, ``(href, rel)`` in document order (see the module docstring).

    The first ``rel="license"`` link to a CC licence wins; ``rel="license"`` links that all point elsewhere mean
    None; without any, the first plain link to a CC licence URL.
    """
    declared_elsewhere = False
    first_plain = None
    for href, rel in links:
        if not href:
            continue
        if is_license_rel(rel):
            license = normalize_cc_license(href)
            if license is not None:
                return license
            declared_elsewhere = True
        elif first_plain is None:
            first_plain = normalize_cc_license(href)
    return None if declared_elsewhere else first_plain
