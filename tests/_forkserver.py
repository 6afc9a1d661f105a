"""A fork server for running many actfmt commands under limits without paying python's start-up for each.

    prlimit --as=N python tests/_forkserver.py cli|torch

Started once (under ``prlimit``, as root or through ``setpriv``), it imports ``actfmt.cli`` and what most
commands need (:data:`PRELOAD`; with ``torch``, torch and :mod:`actfmt.dataset` too) and answers one JSON
request per line on stdin: it forks a child that runs the command with its stdout / stderr in the files named,
its current directory and environment set, and ``alarm(timeout)`` (SIGALRM's default action ends it even inside
a C loop); the server waits for it with ``wait4`` and answers ``{"status": wait status, "maxrss": KB, "torch": whether the command imported torch}``.  The
child's peak RSS includes what it inherited from the server (its baseline, ~55 MB for ``cli``), so the figure
is an upper bound.

Requests: ``{"kind": "cli", "args": [...]}`` runs ``actfmt.cli.main()`` with those arguments; ``{"kind":
"python", "code": ..., "args": [...]}`` runs the code as ``__main__`` with ``sys.argv[1:] = args``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path


def _child(req: dict) -> int:  # type: ignore[type-arg]
    os.chdir(req["cwd"])
    os.environ.update(req["env"])
    for fd, path in ((1, req["out"]), (2, req["err"])):
        new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        os.dup2(new, fd)
        os.close(new)
    signal.alarm(max(1, int(req["timeout"])))
    code = 0
    try:
        if req["kind"] == "cli":
            import actfmt.cli

            sys.argv = ["actfmt", *req["args"]]
            actfmt.cli.main()
        else:
            sys.argv = ["-c", *req["args"]]
            exec(compile(req["code"], "<snippet>", "exec"), {"__name__": "__main__"})
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if "torch" in sys.modules and req.get("note"):
                with open(req["note"], "w") as fh:
                    fh.write("torch")
        except BaseException:  # the exit code is all that is left to report
            pass
    return code


#: Imported by the server, so that each command does not import them again: what most commands need (their
#: RSS, ~55 MB, is part of every child's peak).
PRELOAD = ["actfmt.cli", "actfmt.checks", "actfmt.formats", "actfmt.conversion", "numpy", "h5py", "numcodecs"]


def main() -> None:
    import importlib

    for name in PRELOAD + (["torch", "actfmt.dataset"] if sys.argv[1:] == ["torch"] else []):
        importlib.import_module(name)
    out = sys.stdout
    out.write(json.dumps({"ready": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_child(req))
        _pid, status, usage = os.wait4(pid, 0)
        note = req.get("note")
        torch = bool(note) and os.path.exists(note) and Path(note).read_text() == "torch"
        out.write(json.dumps({"status": status, "maxrss": usage.ru_maxrss, "torch": torch}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
