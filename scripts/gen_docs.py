"""Regenerate the README's config and table reference from laion_spark/config.py and laion_spark/schemas.py.

`python scripts/gen_docs.py` rewrites the marked sections in place; `--check` exits 1 when they are stale
(the test suite runs the check, so the README cannot drift from the code).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from laion_spark import config as config_module  # noqa: E402
from laion_spark import schemas  # noqa: E402

README = ROOT / "README.md"


def _source_comments(path: Path, pattern: str) -> dict[tuple[str, str], str]:
    """Map (enclosing block, name) -> the comment on the name's line or on the comment lines just above it."""
    comments: dict[tuple[str, str], str] = {}
    block = ""
    pending: list[str] = []
    for line in path.read_text().splitlines():
        header = re.match(r"^(?:class (\w+)|(\w+) = _schema\()", line)
        if header:
            block = header.group(1) or header.group(2)
            pending = []
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("# ").strip())
            continue
        match = re.match(pattern, stripped)
        if match:
            trailing = line.split("#", 1)[1].strip() if "  # " in line else ""
            comments[(block, match.group(1))] = " ".join([*pending, trailing]).strip()
        pending = []
    return comments


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    comments = _source_comments(ROOT / "laion_spark" / "config.py", r"^(\w+): ")
    lines: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            hint = hints[field.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{field.name}.")
                continue
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            type_name = getattr(hint, "__name__", str(hint)) if typing.get_origin(hint) is None else str(hint)
            note = comments.get((cls.__name__, field.name), "")
            cells = [f"`{prefix}{field.name}`", type_name.replace("typing.", ""), f"`{default!r}`", note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")

    walk(config_module.Config, "")
    return "| key | type | default | notes |\n|---|---|---|---|\n" + "\n".join(lines)


def tables_reference() -> str:
    comments = _source_comments(ROOT / "laion_spark" / "schemas.py", r'^\("(\w+)",')
    constant_of = {name: const for const, name in vars(schemas).items() if isinstance(name, str) and const.isupper()}
    parts = []
    for table, schema in schemas.SCHEMAS.items():
        block = f"{constant_of[table]}_SCHEMA"
        rows = [
            "| "
            + " | ".join(
                _cell(c)
                for c in (
                    f"`{f.name}`",
                    f.dataType.simpleString(),
                    "yes" if f.nullable else "no",
                    comments.get((block, f.name), ""),
                )
            )
            + " |"
            for f in schema.fields
        ]
        parts.append(f"### `{table}`\n\n| column | type | nullable | notes |\n|---|---|---|---|\n" + "\n".join(rows))
    return "\n\n".join(parts)


SECTIONS = {"config": config_reference, "tables": tables_reference}


def render(text: str) -> str:
    for name, build in SECTIONS.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if start not in text:
            raise SystemExit(f"README.md has no {start} marker")
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = f"{before}{start}\n{build()}\n{end}{after}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    args = parser.parse_args()
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md's generated sections are stale: run `python scripts/gen_docs.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
