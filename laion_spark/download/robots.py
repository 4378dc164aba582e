"""robots.txt (RFC 9309): parsing, and the verdict for one path and our user agent.

A small parser rather than ``urllib.robotparser``: that one matches a group when its name is a substring of the full
User-Agent, takes the first matching rule instead of the longest, and knows neither ``*`` nor ``$`` in paths.

Which group applies: every group that names one of our product tokens (``laion_spark``, ``download.user_agent_token``),
merged; only when none does, the ``*`` groups. Within it the longest matching rule wins, and ``Allow`` wins a tie.
How the fetch status of robots.txt itself is read (see :func:`rules_for_status`):

- 2xx: the file's rules; 3xx is followed like any redirect (at most ``download.max_redirects``).
- 404, 410 and other 4xx: no rules, everything allowed (RFC 9309, 2.3.1.3).
- 401 and 403: everything disallowed. Stricter than RFC 9309, which allows on every 4xx: a site that hides its
  robots.txt behind authentication has not told us we may crawl it.
- 429 and 5xx: everything disallowed, as RFC 9309 asks while the server is in trouble.
- Unreachable (DNS, connection, timeout): the URL fails with that network status and is not fetched, the complete
  disallow RFC 9309 asks for; the row stays a failure that ``--retry-failed`` retries, not a verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

# RFC 9309: crawlers must parse at least 500 KiB; anything after that may be ignored.
MAX_ROBOTS_BYTES = 500 * 1024


def _normalise_path(path: str) -> str:
    """Percent-encoding made uniform, so ``/a%7eb`` and ``/a~b`` compare equal (RFC 9309, 2.2.2)."""
    return quote(unquote(path), safe="/?=&;:@$*!'(),+-._~%")


@dataclass(frozen=True)
class PathPattern:
    """A robots.txt path pattern: a prefix, where ``*`` matches any run of characters and a final ``$`` the end."""

    text: str
    regex: re.Pattern[str] = field(compare=False, repr=False)

    @classmethod
    def parse(cls, text: str) -> PathPattern:
        text = _normalise_path(text)
        anchored = text.endswith("$")
        body = text[:-1] if anchored else text
        regex = ".*".join(re.escape(part) for part in body.split("*")) + ("$" if anchored else "")
        return cls(text, re.compile(regex, re.DOTALL))

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


@dataclass(frozen=True)
class _Rule:
    allow: bool
    pattern: PathPattern


@dataclass(frozen=True)
class RobotsRules:
    """The rules robots.txt gives each agent; ``everything`` (True/False) overrides them for status-only verdicts."""

    groups: tuple[tuple[frozenset[str], tuple[_Rule, ...]], ...] = ()
    everything: bool | None = None

    def allows(self, path: str, agent_tokens: tuple[str, ...]) -> bool:
        """Whether a crawler with these (lower-case) product tokens may fetch ``path`` (with its query)."""
        if self.everything is not None:
            return self.everything
        tokens = set(agent_tokens)
        rules = [rule for agents, group in self.groups if agents & tokens for rule in group]
        if not rules:
            rules = [rule for agents, group in self.groups if "*" in agents for rule in group]
        path = _normalise_path(path or "/")
        best: _Rule | None = None
        for rule in rules:
            if not rule.pattern.text or not rule.pattern.matches(path):
                continue
            if best is None or (len(rule.pattern.text), rule.allow) > (len(best.pattern.text), best.allow):
                best = rule
        return best is None or best.allow


ALLOW_ALL = RobotsRules(everything=True)
DISALLOW_ALL = RobotsRules(everything=False)


def parse_robots_txt(text: str) -> RobotsRules:
    """The groups of a robots.txt file. Unknown lines (Sitemap, Crawl-delay, junk) are skipped, never an error."""
    groups: list[tuple[frozenset[str], tuple[_Rule, ...]]] = []
    agents: list[str] = []
    rules: list[_Rule] = []
    in_rules = False
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip()
        if name in ("user-agent", "useragent", "user agent"):
            if in_rules:
                groups.append((frozenset(agents), tuple(rules)))
                agents, rules, in_rules = [], [], False
            # The product token is what a group names: "laion_spark/1.0" and "LAION_SPARK" both mean laion_spark.
            agents.append(value.split("/", 1)[0].strip().lower())
        elif name in ("allow", "disallow"):
            if not agents:
                continue  # a rule before any User-agent line belongs to no group
            in_rules = True
            if value:  # "Disallow:" with no path allows everything: no rule at all
                rules.append(_Rule(name == "allow", PathPattern.parse(value)))
    if agents:
        groups.append((frozenset(agents), tuple(rules)))
    return RobotsRules(tuple(groups))


def rules_for_status(code: int, body: bytes | None) -> RobotsRules:
    """What robots.txt fetched with HTTP ``code`` means (see the module's docstring)."""
    if 200 <= code < 300:
        return parse_robots_txt((body or b"")[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace"))
    if code in (401, 403) or code == 429 or code >= 500:
        return DISALLOW_ALL
    return ALLOW_ALL
