"""Print (or write into README.md) the rule table generated from ``actfmt.checks.RULES``.

    python scripts/gen_rules_table.py            # print the Markdown table
    python scripts/gen_rules_table.py --write    # replace the table between the markers in README.md
    python scripts/gen_rules_table.py --check    # exit 1 if README.md's table is out of date

The table lives between ``<!-- rules-table:start -->`` and ``<!-- rules-table:end -->``; tests/test_docs.py
fails when it differs from the registry.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START = "<!-- rules-table:start -->"
END = "<!-- rules-table:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def rules_table() -> str:
    """The Markdown table of every rule, by code."""
    from actfmt.checks import RULES

    lines = ["| code | name | severity | what |", "|---|---|---|---|"]
    for code in sorted(RULES):
        rule = RULES[code]
        what = _cell(rule.title())
        if rule.deep and "--deep" not in what:
            what += " (`--deep`)"
        lines.append(f"| {rule.code} | {rule.name} | {rule.severity} | {what} |")
    return "\n".join(lines) + "\n"


def readme_table(text: str) -> str:
    """The text between the markers of ``text`` (raises ValueError when they are missing)."""
    try:
        start = text.index(START) + len(START)
        end = text.index(END, start)
    except ValueError:
        raise ValueError(f"README.md lacks the markers {START} ... {END}") from None
    return text[start:end].strip("\n") + "\n"


def replace_table(text: str, table: str) -> str:
    start = text.index(START) + len(START)
    end = text.index(END, start)
    return text[:start] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update README.md in place")
    group.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    args = parser.parse_args(argv)
    table = rules_table()
    if not (args.write or args.check):
        sys.stdout.write(table)
        return 0
    text = README.read_text(encoding="utf-8")
    if args.check:
        if readme_table(text) != table:
            print("README.md's rule table is out of date: run python scripts/gen_rules_table.py --write")
            return 1
        return 0
    README.write_text(replace_table(text, table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
