"""Read everything of a split (``actfmt.open``) or of a tree (``actfmt.open_tree``) through the public API, and
say whether the values or metadata read hold a secret.  Used by tests/test_untrusted.py in its own process and
in a fork of tests/_forkserver.py (``python -c`` code: ``import _openread; _openread.main()``)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

#: Bytes of /etc/passwd (tests.crafted's h5_external_passwd points at it).
EXTRA_SECRETS = (b"root:x:0:0:",)


def _read(s: Any, token: bytes) -> bool:
    import torch

    leak = token in json.dumps(s.metadata, default=str).encode("utf-8", "surrogateescape")
    for i in s.layers:
        lv = s.layer(i)
        raw = lv[:].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        leak |= token in raw or any(x in raw for x in EXTRA_SECRETS)
        if len(lv):
            lv[[0, len(lv) - 1]]
    if len(s):
        s.example(0)
    return leak


def read(path: str, tree: bool, token: bytes) -> tuple[bool, str]:
    """(leak, a line saying what was read); ActfmtError propagates."""
    import actfmt

    if tree:
        leak, seen = False, []
        for key, s in actfmt.open_tree(path).items():
            with s:
                leak |= _read(s, token)
                seen.append("/".join(map(str, key)))
        return leak, f"read tree {seen}"
    with actfmt.open(path) as s:
        return _read(s, token), f"read {s.layers} {len(s)}"


def main() -> None:
    from actfmt.errors import ActfmtError

    path, mode = sys.argv[1], sys.argv[2]
    token = os.environb[b"ACTFMT_CORPUS_TOKEN"]
    leak = False
    try:
        leak, line = read(path, mode == "tree", token)
        print(line)
    except ActfmtError as exc:
        print(f"actfmt: error: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        if leak:
            print("LEAK: the values or metadata read hold the token", file=sys.stderr)
