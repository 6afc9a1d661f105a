"""Run a command on a pseudo-terminal of a given width and read what it wrote (for tests of terminal output)."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
from pathlib import Path

import actfmt

SRC = str(Path(actfmt.__file__).resolve().parent.parent)
_SGR = re.compile(r"\x1b\[[0-9;]*m")
_CURSOR = re.compile(r"\x1b\[\??[0-9;]*[A-Za-z]")


def in_pty(argv: list[str], columns: int, *, colour: bool, cwd: Path) -> str:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal ``columns`` wide; what it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR")}
    env.update({"PYTHONPATH": SRC, "TERM": "xterm-256color"})
    if not colour:
        env["NO_COLOR"] = "1"
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            out += data
    finally:
        os.close(master)
        proc.wait(timeout=120)
    assert proc.returncode in (0, 1), out.decode(errors="replace")
    return out.decode("utf-8")


def lines_of(out: str) -> list[str]:
    """The lines the terminal shows (colour and cursor codes dropped, every redraw a line of its own)."""
    return [_CURSOR.sub("", _SGR.sub("", line)) for line in re.split(r"\r\n|\r|\n", out)]
