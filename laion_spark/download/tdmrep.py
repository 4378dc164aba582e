"""The W3C TDM Reservation Protocol (TDMRep): a site reserving text-and-data-mining rights over its content.

Two of its channels apply to images: the ``tdm-reservation: 1`` response header, and the origin's
``/.well-known/tdmrep.json``, a list of ``{"location": pattern, "tdm-reservation": 0 | 1, "tdm-policy": url}`` rules.
A location is a path pattern as in robots.txt (``*`` any run of characters, a final ``$`` the end); the first rule
whose location matches the path decides. A reservation means status ``disallowed``. A missing, unreadable or
malformed tdmrep.json reserves nothing: the protocol makes reservation something a site states, not a default.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from laion_spark.download.robots import PathPattern

WELL_KNOWN_PATH = "/.well-known/tdmrep.json"
MAX_TDMREP_BYTES = 500 * 1024


def header_reserves(values: Iterable[str]) -> bool:
    """True when a ``tdm-reservation`` header says 1."""
    return any(value.strip() == "1" for value in values)


@dataclass(frozen=True)
class TdmRules:
    """The rules of one origin's tdmrep.json, in file order."""

    rules: tuple[tuple[PathPattern, bool], ...] = ()

    def reserves(self, path: str) -> bool:
        for pattern, reserved in self.rules:
            if pattern.matches(path or "/"):
                return reserved
        return False


NO_RESERVATION = TdmRules()


def parse_tdmrep_json(body: bytes) -> TdmRules:
    """The rules of a tdmrep.json file; anything malformed is skipped (a broken file reserves nothing)."""
    try:
        entries = json.loads(body[:MAX_TDMREP_BYTES].decode("utf-8", errors="replace"))
    except ValueError:
        return NO_RESERVATION
    if not isinstance(entries, list):
        return NO_RESERVATION
    rules = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("location"), str):
            continue
        reservation = entry.get("tdm-reservation")
        rules.append((PathPattern.parse(entry["location"]), reservation in (1, "1", True)))
    return TdmRules(tuple(rules))


def rules_for_status(code: int, body: bytes | None) -> TdmRules:
    if 200 <= code < 300 and body:
        return parse_tdmrep_json(body)
    return NO_RESERVATION
