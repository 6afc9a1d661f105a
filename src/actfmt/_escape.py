"""How a name from a tree is shown: one rule for every output (issue 16, the output half of the trust boundary).

A tree's names (directories, files, layers inside a store, strings of its ``metadata.json``) are chosen by whoever
made the tree, and actfmt prints them to terminals and CI logs.  Every text actfmt prints goes through
:func:`escape_line` (or :func:`escape` for a fragment), so a name can neither move the cursor, clear the screen,
start a new line, nor issue a CI workflow command:

- an undecodable file-name byte (``os.fsdecode``'s surrogate escape) is written ``\\xff``, in every output;
- control characters (C0 with ``\\t``, ``\\n`` and ``\\r``; DEL; C1), lone surrogates, line and paragraph
  separators, bidirectional overrides and the BOM are written like Python's ``repr`` writes them (``\\n``,
  ``\\x1b``, ``\\u202e``), without the quotes; printable text and backslashes are kept as they are;
- a line whose first non-blank characters are ``::`` (a GitHub Actions workflow command: ``::error``,
  ``::add-mask::``, ``::stop-commands::``) has that first colon written ``\\x3a``; ``##[`` and ``##vso[`` (the older
  GitHub and the Azure Pipelines command prefixes, honoured anywhere in a line) have their bracket written
  ``\\x5b``.

The escaping is idempotent (escaped text escapes to itself).  Machine-readable outputs keep the characters JSON or
XML can carry: :func:`json_safe` applies the surrogate rule only, :func:`dumps` writes JSON whose bytes hold no
control character either (JSON escapes them), and the GitHub workflow-command encodings are :func:`gh_data` and
:func:`gh_property`.  Rich markup in a name is never interpreted: renderers print names as ``rich.text.Text``, and
:func:`markup` escapes a name for the places that take markup (progress-bar descriptions).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = [
    "dumps",
    "escape",
    "escape_line",
    "escape_lines",
    "gh_data",
    "gh_property",
    "json_safe",
    "markup",
    "neutralise",
]

#: What :func:`escape` rewrites: C0, DEL, C1, surrogates, NEL/LS/PS, bidi controls (ALM, LRM, RLM, LRE..RLO,
#: LRI..PDI) and the BOM.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]"
)
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
#: Prefixes of CI commands that a runner honours anywhere in a line.
_INLINE_COMMAND = re.compile(r"##(vso)?\[", re.IGNORECASE)
#: Characters that JSON may hold raw but a terminal may act on: DEL, C1, separators, bidi controls, BOM.
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def _char(match: re.Match[str]) -> str:
    c = match.group()
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte of a file name
        return f"\\x{o - 0xDC00:02x}"
    if c in _NAMED:
        return _NAMED[c]
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def escape(text: str) -> str:
    """``text`` with every character that is not plain printable text written visibly (``\\n``, ``\\x1b``,
    ``\\xff`` for an undecodable byte), on one line; ``##[`` neutralised."""
    text = _UNSAFE.sub(_char, str(text))
    return _INLINE_COMMAND.sub(lambda m: m.group()[:-1] + "\\x5b", text)


def neutralise(line: str) -> str:
    """``line`` with a leading ``::`` (after blanks) written ``\\x3a:``, so that no CI runner reads it as a
    command."""
    stripped = line.lstrip()
    if stripped.startswith("::"):
        at = len(line) - len(stripped)
        return line[:at] + "\\x3a" + line[at + 1 :]
    return line


def escape_line(text: str) -> str:
    """One line of output that holds names: :func:`escape`, then :func:`neutralise`."""
    return neutralise(escape(text))


def escape_lines(text: str) -> str:
    """A message of several lines (``\\n``-separated, e.g. a library error listing findings): each line
    :func:`escape_line`-d, the line breaks kept."""
    return "\n".join(escape_line(line) for line in str(text).split("\n"))


def json_safe(value: Any) -> Any:
    """``value`` (dicts, lists, tuples, strings, numbers) with the surrogate rule applied to every string: an
    undecodable byte becomes ``\\xff``, like in the text output; every other character is kept."""
    if isinstance(value, str):
        return _surrogates(value)
    if isinstance(value, dict):
        return {(_surrogates(k) if isinstance(k, str) else k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogates(text: str) -> str:
    return _SURROGATE.sub(_char, text)


def dumps(data: Any, *, indent: int | None = 2, ensure_ascii: bool = False) -> str:
    """JSON for any name: valid UTF-8 (:func:`json_safe`), and no raw control, separator or bidi character
    (JSON escapes C0; DEL, C1 and the rest are written ``\\u009b``) nor ``##[``, so the bytes are safe on a
    terminal and in a CI log while the values are the names.
    ``ensure_ascii``: every non-ASCII character written ``\\uXXXX``."""
    text = json.dumps(json_safe(data), indent=indent, ensure_ascii=ensure_ascii)
    # Outside strings JSON is ASCII: every such character is inside a string, where \\uXXXX means the same;
    # so is every ``#``, and ``##\\u005b`` is the same string as ``##[`` to a parser, not to a CI runner.
    text = _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return _INLINE_COMMAND.sub(lambda m: m.group()[:-1] + "\\u005b", text)


def gh_data(text: str) -> str:
    """The data of a GitHub workflow command (after ``::``): its line breaks encoded as GitHub decodes them
    (``%0A``, ``%0D``; ``%`` itself is ``%25``), everything else :func:`escape`-d."""

    def piece(part: str) -> str:
        return escape(part).replace("%", "%25")

    return "%0A".join("%0D".join(piece(p) for p in line.split("\r")) for line in str(text).split("\n"))


def gh_property(text: str) -> str:
    """A property value of a GitHub workflow command (``file=``, ``title=``): :func:`escape`-d (a name looks as in
    the text output), then ``%``, ``:`` and ``,`` encoded (and CR, LF, though none is left)."""
    encoded = escape(text).replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return encoded.replace(":", "%3A").replace(",", "%2C")


def markup(text: str) -> str:
    """A name for a place that takes rich markup: :func:`escape_line`-d, and ``[`` escaped."""
    from rich.markup import escape as rich_escape

    return rich_escape(escape_line(text))
