#!/usr/bin/env python
"""Summarise a run of tests/test_untrusted.py (its --junitxml) as a Markdown status table: case x command.

python -m pytest tests/test_untrusted.py --junitxml=run.xml
python scripts/corpus_status.py run.xml [--title TEXT] > CORPUS_STATUS.md
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import crafted
from tests.test_untrusted import commands_for

COLUMNS = [
    "validate-text",
    "validate-json",
    "validate-github",
    "validate-junit",
    "validate-sarif",
    "validate-deep",
    "info",
    "info-json",
    "stats",
    "convert-pt",
    "convert-zarr",
    "convert-force",
    "verify",
    "open",
    "nobody",
]
SHORT = {
    "validate-text": "v:text",
    "validate-json": "v:json",
    "validate-github": "v:gh",
    "validate-junit": "v:junit",
    "validate-sarif": "v:sarif",
    "validate-deep": "v:deep",
    "info-json": "info:json",
    "convert-pt": "conv:pt",
    "convert-zarr": "conv:zarr",
    "convert-force": "conv:force",
}


def reasons(text: str) -> list[str]:
    """The problems an assertion listed: its ``- ...`` lines (the matrix), else the lines of its message."""
    lines = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    out = [ln[2:] for ln in lines if ln.startswith("- ")]
    if not out:
        msg: list[str] = []
        for ln in lines:
            if ln.startswith(("assert ", "+", "where", "--- ")):
                break
            msg.append(ln.removeprefix("AssertionError: "))
        out = [m for m in msg if m] or [text.strip().splitlines()[-1][:200] if text.strip() else "failed"]
    return [re.sub(r"/tmp/actfmt-crafted-[^/ ]+/", "", r)[:220] for r in out]


def main(argv: list[str]) -> int:
    title = argv[argv.index("--title") + 1] if "--title" in argv else argv[0]
    files = [a for k, a in enumerate(argv) if not a.startswith("--") and (k == 0 or argv[k - 1] != "--title")]
    latest: dict[str, ET.Element] = {}  # a later run of a test replaces an earlier one
    for f in files:
        for tc in ET.parse(f).iter("testcase"):
            latest[tc.get("name", "")] = tc
    cells: dict[str, dict[str, str]] = defaultdict(dict)
    why: dict[tuple[str, str], list[str]] = {}
    scenario: dict[str, tuple[str, list[str]]] = {}
    for name, tc in latest.items():
        fail = tc.find("failure")
        if fail is None:
            fail = tc.find("error")
        skipped = tc.find("skipped") is not None
        status = "skip" if skipped else ("FAIL" if fail is not None else "ok")
        text = (fail.text or fail.get("message", "")) if fail is not None else ""
        m = re.fullmatch(r"test_crafted\[(.+)-((?:validate|convert|info|stats|verify|open)[\w-]*)\]", name)
        if m:
            case, cmd = m.groups()
            cells[case][cmd] = status
            if fail is not None:
                why[(case, cmd)] = reasons(text)
            continue
        m = re.fullmatch(r"test_crafted_link_unprivileged\[(.+)\]", name)
        if m:
            cells[m.group(1)]["nobody"] = status
            if fail is not None:
                why[(m.group(1), "nobody")] = reasons(text)
            continue
        scenario[name] = (status, reasons(text) if fail is not None else [])

    total = sum(len(v) for v in cells.values()) + len(scenario)
    failed = sum(1 for v in cells.values() for s in v.values() if s == "FAIL")
    failed += sum(1 for s, _ in scenario.values() if s == "FAIL")
    print(f"# Corpus status: {title}\n")
    print(f"{total} checks, {failed} failing, {total - failed} passing.\n")
    print("Legend: ok = passes; **FAIL** = fails (reasons below); - = not run for this case.")
    print(
        "Area: whose branch owns the fix (storage = containment/destinations/locks/timeouts, sizes = header"
    )
    print("size checks, output = escaping, convert = checksums while converting / shape vs metadata rule).\n")
    print("| case | family | area | " + " | ".join(SHORT.get(c, c) for c in COLUMNS) + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    for name, c in crafted.CASES.items():
        if c.kind != "tree":
            continue
        row = cells.get(name, {})
        cols = []
        for col in COLUMNS:
            st = row.get(col)
            if st is None:
                cols.append("-" if col == "nobody" or col not in commands_for(c) else "?")
            else:
                cols.append("**FAIL**" if st == "FAIL" else st)
        print(f"| {name} | {c.family} | {c.area} | " + " | ".join(cols) + " |")
    print("\n## Scenario tests (destinations, locks, collision, remote)\n")
    print("| test | status | reasons |")
    print("|---|---|---|")
    for name, (st, rs) in scenario.items():
        print(
            f"| {name} | {'**FAIL**' if st == 'FAIL' else st} | {'<br>'.join(r.replace('|', '/') for r in rs)} |"
        )
    print("\n## Failure reasons, per case\n")
    for name, c in crafted.CASES.items():
        items = [(cmd, rs) for (case, cmd), rs in why.items() if case == name]
        if not items:
            continue
        print(f"### {name} ({c.area}) — {c.doc}\n")
        grouped: dict[tuple[str, ...], list[str]] = defaultdict(list)
        for cmd, rs in items:
            grouped[tuple(rs)].append(cmd)
        for rs, cmds in grouped.items():
            print(f"- {', '.join(cmds)}: " + "; ".join(r.replace("|", "/") for r in rs))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
