"""Real faults for tests: an unprivileged user (``setpriv`` when the tests run as root), a world-writable
scratch directory that user can reach, and running the CLI as a process."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

NOBODY = 65534


def as_user_prefix() -> list[str]:
    """The command prefix that drops root's privileges (``[]`` when not root: chmod already bites)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip(
            "running as root without setpriv (util-linux): cannot drop privileges to test permissions"
        )
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def actfmt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "actfmt", *args]


def run(
    cmd: list[str], unprivileged: bool = False, timeout: float = 120, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (as an unprivileged user if asked), capturing text output."""
    prefix = as_user_prefix() if unprivileged else []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "120", **kw.pop("env", {})}
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def run_json(cmd: list[str], unprivileged: bool = False) -> Any:
    res = run(cmd, unprivileged=unprivileged)
    assert res.returncode in (0, 1), res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A scratch directory every user can enter, read and write (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="actfmt-faults-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for p in [path, *path.rglob("*")]:  # make everything removable again
            try:
                if not p.is_symlink():
                    p.chmod(p.stat().st_mode | stat.S_IRWXU)
            except OSError:
                pass
        shutil.rmtree(path, ignore_errors=True)


def world_readable(path: Path) -> None:
    """Let the unprivileged user read (and write) everything below ``path``."""
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o777 if p.is_dir() else 0o666)
