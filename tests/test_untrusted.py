"""Issue 16, the trust boundary: every command on every crafted tree of :mod:`tests.crafted`.

For each case x command: exit 0/1/2 and no internal error or traceback; the finding code the case expects
(validate: exit 1); no byte of the secret token (the files outside the tree) in stdout, stderr, the values read
or any file of the destination; nothing outside the destination created, changed or removed (the workspace is
hashed before and after); no control character (but ``\\n``, ``\\t``) and no line-initial ``::`` in text output
(github: only the reporter's own ``::error`` / ``::warning`` / ``::notice`` lines, their properties escaped);
json / sarif parse, junit parses as XML.

Bombs (``Case.limits``) and a sample of the other cases run as a subprocess under ``prlimit --as`` (1.5 GB: the
torch import alone needs ~0.8 GB of address space) and a timeout, and their peak RSS (``wait4``) must stay
within ``RSS_BUDGET`` (CLI) or ``RSS_BUDGET`` above a plain read of a valid split (``open``: the torch import
alone is ~230 MB).  The link and lock cases run again as an unprivileged user in a shared sticky directory.
The rest run in this process (CliRunner), with the workspace as the current directory and HOME in a scratch
directory.  ``ACTFMT_CORPUS_TIMEOUT`` overrides the per-command timeout (seconds).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from actfmt.cli import cli
from actfmt.conversion import convert as actfmt_convert
from actfmt.errors import ActfmtError
from tests import _openread, crafted
from tests._faults import NOBODY, as_user_prefix

HERE = Path(__file__).resolve().parent
AS_LIMIT = 1536 * 1024 * 1024  # prlimit --as
TIMEOUT = float(os.environ.get("ACTFMT_CORPUS_TIMEOUT", "20"))
RSS_BUDGET_KB = 200 * 1024

FORMATS = ("text", "json", "github", "junit", "sarif")
#: Cases (beyond the bombs) that also run as subprocesses under the limits, one or two per family.
SAMPLE = {
    "link_pt_shard",
    "link_h5_file",
    "h5_external_abs",
    "zarr_key_escape",
    "name_gh_error",
    "name_xff",
    "zarr_codec_pickle",
    "pt_offset_neg",
    "zarr_flipped_byte",
}
SAMPLE_COMMANDS = ("validate-text", "convert-pt")


def commands_for(c: crafted.Case) -> list[str]:
    if c.kind != "tree":
        return []
    out = [f"validate-{f}" for f in FORMATS] + ["validate-deep", "info", "info-json", "stats"]
    out += ["convert-pt", "convert-zarr"]
    if c.family in ("link", "external"):
        out.append("convert-force")
    if c.pair and c.split:
        out.append("verify")
    if c.split or c.open_tree:
        out.append("open")
    return out


MATRIX = [(name, cmd) for name, c in crafted.CASES.items() for cmd in commands_for(c)]


# -------------------------------------------------------------------------------------------------------------
# the corpus (built once per session, in a directory every user can read)


@pytest.fixture(scope="session")
def corpus() -> Iterator[crafted.Corpus]:
    root = Path(tempfile.mkdtemp(prefix="actfmt-crafted-"))
    try:
        built = crafted.build(root)
        for sub in (".dst", ".home", ".tmp"):
            (root / sub).mkdir()
        _readable(root)
        (root / ".tmp").chmod(0o1777)
        yield built
    finally:
        _removable(root)
        shutil.rmtree(root, ignore_errors=True)


def _readable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode):
            p.chmod(0o755)
        elif stat.S_ISREG(mode):
            p.chmod(0o644)


def _removable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            if not p.is_symlink() and p.is_dir():
                p.chmod(0o777)


# -------------------------------------------------------------------------------------------------------------
# running a command


@dataclass
class Ran:
    what: str
    rc: int
    out: bytes
    err: bytes
    seconds: float
    maxrss_kb: int | None = None  # subprocesses only
    killed: bool = False
    leak: bool = False  # open: the values or the metadata read held the token
    torch: bool = False  # the command imported torch (fork server runs only)

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "surrogateescape")

    @property
    def etext(self) -> str:
        return self.err.decode("utf-8", "surrogateescape")


OPEN_SNIPPET = "import _openread\n_openread.main()\n"  # run by the fork server (tests/ is its sys.path[0])


def _env(corpus: crafted.Corpus, name: str) -> dict[str, str]:
    home = corpus.root / ".home" / name
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o777)
    return {
        "HOME": str(home),
        "TMPDIR": str(corpus.root / ".tmp"),
        "COLUMNS": "120",
        "NO_COLOR": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "ACTFMT_CORPUS_TOKEN": corpus.token,
    }


def run_subprocess(
    argv: list[str], cwd: Path, env: dict[str, str], unprivileged: bool = False, timeout: float = TIMEOUT
) -> Ran:
    """``argv`` (after ``python``) under prlimit --as and timeout, as nobody if asked.

    The peak RSS comes from ``/usr/bin/time`` around the whole chain: the RSS a child forked from this (large)
    process has before its exec would count in a ``wait4`` of our own child."""
    prefix = as_user_prefix() if unprivileged else []
    fd, rss_file = tempfile.mkstemp(prefix="rss-", dir=env.get("TMPDIR"))
    os.close(fd)
    os.chmod(rss_file, 0o666)
    cmd = [
        "/usr/bin/time",
        "-f",
        "%M",
        "-o",
        rss_file,
        "prlimit",
        f"--as={AS_LIMIT}",
        "--",
        "timeout",
        "-s",
        "KILL",
        str(timeout),
        *prefix,  # setpriv right before python: an unprivileged process cannot exec the venv's python again
        sys.executable,
        *argv,
    ]
    full_env = {**os.environ, **env}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=cwd, env=full_env, stdout=out, stderr=err, stdin=subprocess.DEVNULL, check=False
        )
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        o, e = out.read(), err.read()
    rss_text = Path(rss_file).read_text()
    os.unlink(rss_file)
    digits = [ln for ln in rss_text.splitlines() if ln.strip().isdigit()]
    rss = int(digits[-1]) if digits else None
    rc = proc.returncode
    # time reports a child killed by a signal as "Command terminated by signal 9" and exits 128 + n
    killed = rc in (124, 137, -9) or "terminated by signal" in rss_text
    return Ran(" ".join(argv), rc, o, e, seconds, rss, killed=killed)


class ForkServer:
    """``tests/_forkserver.py`` under prlimit --as (as nobody if asked): one fork per command, its own timeout."""

    def __init__(self, preload: str, unprivileged: bool, tmp: Path) -> None:
        prefix = as_user_prefix() if unprivileged else []
        cmd = [
            "prlimit",
            f"--as={AS_LIMIT}",
            "--",
            *prefix,  # setpriv right before python: an unprivileged process cannot exec the venv's python
            sys.executable,
            str(HERE / "_forkserver.py"),
            preload,
        ]
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.tmp = tmp
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the fork server ({preload}) did not start"
        self.baseline_kb = int(json.loads(line)["ready"])

    def run(
        self,
        kind: str,
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        code: str = "",
        timeout: float = TIMEOUT,
    ) -> Ran:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        paths = []
        for tag in ("out", "err", "note"):
            fd, path = tempfile.mkstemp(prefix=f"{tag}-", dir=self.tmp)
            os.close(fd)
            os.chmod(path, 0o666)
            paths.append(path)
        req = {"kind": kind, "args": args, "code": code, "cwd": str(cwd), "env": env, "timeout": timeout}
        req.update(out=paths[0], err=paths[1], note=paths[2])
        t0 = time.perf_counter()
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        seconds = time.perf_counter() - t0
        o, e = (Path(x).read_bytes() for x in paths[:2])
        for x in paths:
            os.unlink(x)
        rc = os.waitstatus_to_exitcode(answer["status"])
        if rc < 0:
            e += f"\n[killed by signal {-rc} ({signal.Signals(-rc).name})]".encode()
        what = " ".join(args) if kind == "cli" else f"open {' '.join(args)}"
        torch = answer.get("torch", False)
        return Ran(what, rc, o, e, seconds, answer["maxrss"], killed=rc < 0, torch=torch)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()


class Servers:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._up: dict[tuple[str, bool], ForkServer] = {}

    def get(self, preload: str, unprivileged: bool = False) -> ForkServer:
        key = (preload, unprivileged)
        if key not in self._up:
            self._up[key] = ForkServer(preload, unprivileged, self.tmp)
        return self._up[key]

    def cli(self, args: list[str], cwd: Path, env: dict[str, str], unprivileged: bool = False) -> Ran:
        return self.get("cli", unprivileged).run("cli", args, cwd, env)

    def open(
        self, path: Path, cwd: Path, env: dict[str, str], unprivileged: bool = False, tree: bool = False
    ) -> Ran:
        args = [str(path), "tree" if tree else "split"]
        return self.get("torch", unprivileged).run("python", args, cwd, env, code=OPEN_SNIPPET)

    def close(self) -> None:
        for srv in self._up.values():
            srv.close()


@pytest.fixture(scope="session")
def servers(corpus: crafted.Corpus) -> Iterator[Servers]:
    srv = Servers(corpus.root / ".tmp")
    try:
        yield srv
    finally:
        srv.close()


def run_inprocess(args: list[str], cwd: Path, env: dict[str, str]) -> Ran:
    t0 = time.perf_counter()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        res = CliRunner().invoke(cli, args, env=env, catch_exceptions=True)
    finally:
        os.chdir(old)
    err = res.stderr_bytes or b""
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        tb = "".join(traceback.format_exception(res.exception))
        err += f"\nTraceback (escaped the CLI):\n{tb}".encode()
    return Ran(" ".join(args), res.exit_code, res.stdout_bytes, err, time.perf_counter() - t0)


def open_inprocess(path: Path, tree: bool, cwd: Path, token: str) -> Ran:
    t0 = time.perf_counter()
    old = os.getcwd()
    os.chdir(cwd)
    out, err, rc, leak = io.StringIO(), io.StringIO(), 0, False
    try:
        leak, line = _openread.read(str(path), tree, token.encode())
        print(line, file=out)
    except ActfmtError as exc:
        print(f"actfmt: error: {exc}", file=err)
        rc = 1
    except Exception:
        err.write("Traceback (an exception that is not an ActfmtError):\n" + traceback.format_exc())
        rc = 2
    finally:
        os.chdir(old)
    if leak:
        err.write("LEAK: the values or metadata read hold the token\n")
    return Ran(f"open {path}", rc, out.getvalue().encode(), err.getvalue().encode(), time.perf_counter() - t0)


def argv_for(cmd: str, c: crafted.Case, ws: Path, dst: Path) -> list[str]:
    root = str(ws / c.root)
    if cmd.startswith("validate-") and cmd != "validate-deep":
        return ["validate", root, "--output-format", cmd.split("-", 1)[1], "--no-progress"]
    return {
        "validate-deep": ["validate", "--deep", root, "--no-progress"],
        "info": ["info", root],
        "info-json": ["info", "--json", root],
        "stats": ["stats", root, "--no-progress", "-j", "1"],
        "verify": ["verify", str(ws / (c.split or "")), str(ws / (c.pair or "")), "--no-progress"],
        "convert-pt": ["convert", root, str(dst), "--to", "pt", "-j", "1", "--no-progress"],
        "convert-zarr": [
            "convert",
            root,
            str(dst),
            "--to",
            "zarr",
            "--compression",
            "none",
            "-j",
            "1",
            "--no-progress",
        ],
        "convert-force": ["convert", root, str(dst), "--to", "pt", "--force", "-j", "1", "--no-progress"],
    }[cmd]


# -------------------------------------------------------------------------------------------------------------
# what must hold


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root`` (links not followed): type, size and content hash, or link target."""
    out: dict[str, tuple[Any, ...]] = {}
    broot = os.fsencode(root)
    bskip = tuple(os.fsencode(s) for s in skip)
    for dirpath, dirnames, filenames in os.walk(broot):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in bskip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p in bskip:
                continue
            st = os.lstat(p)
            rel = os.fsdecode(os.path.relpath(p, broot))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.fsdecode(os.readlink(p)))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    out[rel] = (
                        "file",
                        st.st_size,
                        hashlib.sha256(fh.read()).hexdigest(),
                        stat.S_IMODE(st.st_mode),
                    )
            else:
                out[rel] = (stat.S_IFMT(st.st_mode),)
    return out


def diff(before: dict[str, Any], after: dict[str, Any], most: int = 4) -> list[str]:
    """What was created, removed or changed (the first ``most`` of each, then a count)."""
    out = []
    for what, keys in (
        ("created", sorted(after.keys() - before.keys())),
        ("removed", sorted(before.keys() - after.keys())),
        ("changed", sorted(k for k in before.keys() & after.keys() if before[k] != after[k])),
    ):
        out += [f"{what} {k}" for k in keys[:most]]
        if len(keys) > most:
            out.append(f"{what} {len(keys) - most} more")
    return out


def token_in_tree(root: Path, token: bytes) -> list[str]:
    """Files under ``root`` holding the token (or part of it); links under it that leave it."""
    hits = []
    if not os.path.lexists(root):
        return hits
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            target = Path(os.path.realpath(p))
            if not target.is_relative_to(root.resolve()):
                hits.append(f"{p.relative_to(root)} is a link out of the destination ({os.readlink(p)})")
        elif p.is_file():
            data = p.read_bytes()
            if token in data or token[:12] in data or any(x in data for x in EXTRA_SECRETS):
                hits.append(f"{p.relative_to(root)} holds the secret token (or /etc/passwd)")
    return hits


BAD_TEXT = ("internal error", "Traceback")
#: Bytes of files outside every tree that must never show up either (h5_external_passwd points at it).
EXTRA_SECRETS = _openread.EXTRA_SECRETS


def _controls(text: str) -> list[str]:
    bad = sorted({ch for ch in text if (ord(ch) < 32 and ch not in "\n\t") or 0x7F <= ord(ch) < 0xA0})
    return [repr(ch) for ch in bad]


def text_problems(label: str, text: str, github: bool = False) -> list[str]:
    out = []
    bad = _controls(text)
    if bad:
        out.append(f"{label}: control characters {', '.join(bad)}")
    for line in text.splitlines():
        s = line.lstrip()
        if not s.startswith("::"):
            continue
        if github:
            head, sep, _msg = s[2:].partition("::")
            cmd, _, props = head.partition(" ")
            if sep and cmd in ("error", "warning", "notice") and ":" not in props and "\n" not in props:
                continue
        out.append(f"{label}: a line starts with '::' ({line[:80]!r})")
    return out


def common_problems(ran: Ran, token: str, expect_rc: tuple[int, ...] = (0, 1, 2)) -> list[str]:
    out = []
    if ran.killed:
        out.append(f"killed (timeout {TIMEOUT:g} s or memory), rc {ran.rc}, after {ran.seconds:.1f} s")
    elif ran.rc not in expect_rc:
        out.append(f"exit {ran.rc}, expected one of {expect_rc}")
    for bad in BAD_TEXT:
        if bad in ran.etext or bad in ran.text:
            line = next((ln for ln in (ran.etext + "\n" + ran.text).splitlines() if bad in ln), bad)
            last = (
                [ln for ln in ran.etext.splitlines() if ln.strip()][-1:] if "Traceback" in ran.etext else []
            )
            out.append(
                f"{bad!r} in the output: {line.strip()[:200]}" + (f" / {last[0][:200]}" if last else "")
            )
            break
    if "MemoryError" in ran.etext and not out:
        out.append("MemoryError in stderr")
    t = token.encode()
    if t in ran.out or t[:12] in ran.out:
        out.append("stdout holds the secret token")
    if t in ran.err or t[:12] in ran.err:
        out.append("stderr holds the secret token")
    for x in EXTRA_SECRETS:
        if x in ran.out or x in ran.err:
            out.append(f"the output holds bytes of a file outside the tree ({x!r})")
    if ran.leak or b"LEAK:" in ran.err:
        out.append("open read the secret (values or metadata hold the token)")
    return out


def format_problems(cmd: str, ran: Ran) -> list[str]:
    out = []
    if cmd in ("validate-json", "validate-sarif", "info-json"):
        try:
            doc = json.loads(ran.out.decode("utf-8"))
            if cmd == "validate-sarif" and not (isinstance(doc, dict) and isinstance(doc.get("runs"), list)):
                out.append("sarif: no runs list")
        except (UnicodeDecodeError, ValueError) as exc:
            if ran.out.strip() or ran.rc in (0, 1):
                out.append(f"{cmd}: stdout does not parse as JSON ({exc})"[:200])
    elif cmd == "validate-junit":
        try:
            ET.fromstring(ran.out)
        except ET.ParseError as exc:
            if ran.out.strip() or ran.rc in (0, 1):
                out.append(f"junit: stdout does not parse as XML ({exc})")
    else:
        out += text_problems("stdout", ran.text, github=cmd == "validate-github")
    out += text_problems("stderr", ran.etext)
    for label, raw in (("stdout", ran.out), ("stderr", ran.err)):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.append(
                f"{label} is not valid UTF-8 (a raw byte {raw[exc.start : exc.start + 1]!r} of a name)"
            )
    return out


def codes_problems(cmd: str, ran: Ran, expect: tuple[str, ...] | None) -> list[str]:
    if expect is None:
        return []
    out = []
    if ran.rc != 1:
        out.append(f"validate exit {ran.rc}, expected 1 with {'/'.join(expect)}")
    if cmd == "validate-json":
        with contextlib.suppress(UnicodeDecodeError, ValueError):
            doc = json.loads(ran.out.decode("utf-8"))
            reports = doc if isinstance(doc, list) else [doc]
            found = {i.get("code") for r in reports for i in r.get("issues", [])}
            if not found & set(expect):
                out.append(f"no {'/'.join(expect)} finding (found: {', '.join(sorted(found)) or 'none'})")
            return out
    if not any(code in ran.text for code in expect):
        out.append(f"no {'/'.join(expect)} finding in the output")
    return out


def _published(dst: Path) -> list[str]:
    if not dst.exists():
        return []
    return [p.name for p in dst.iterdir() if not p.name.startswith(".")]


_RSS_BASE: dict[str, int] = {}


def rss_budget(cmd: str, corpus: crafted.Corpus, servers: Servers) -> int:
    """KB: RSS_BUDGET for the CLI; for ``open`` the same above reading a valid split (torch's import alone is
    ~230 MB)."""
    if cmd != "open":
        return RSS_BUDGET_KB
    if "open" not in _RSS_BASE:
        valid = crafted.Kit(corpus.root / ".cache", corpus.token).valid("pt")
        ran = servers.open(valid, corpus.root, _env(corpus, "_baseline"))
        assert ran.rc == 0, ran.etext
        _RSS_BASE["open"] = ran.maxrss_kb or 0
    return _RSS_BASE["open"] + RSS_BUDGET_KB


# -------------------------------------------------------------------------------------------------------------
# the matrix


def open_target(c: crafted.Case, ws: Path) -> tuple[Path, bool]:
    """What ``open`` reads: the split, or (``Case.open_tree``: the split's own path is the link) the tree."""
    if c.open_tree:
        return ws / c.root, True
    assert c.split
    return ws / c.split, False


def run_case(corpus: crafted.Corpus, servers: Servers, c: crafted.Case, cmd: str, dst: Path) -> Ran:
    """Bombs: every command in a fork of the limited server.  The sample: validate and convert as real
    ``python -m actfmt`` processes under the limits, open in the limited server.  The rest: in this process."""
    ws = corpus.ws(c.name)
    env = _env(corpus, c.name)
    sample = c.name in SAMPLE
    if cmd == "open":
        path, tree = open_target(c, ws)
        if c.limits or sample:
            return servers.open(path, ws, env, tree=tree)
        return open_inprocess(path, tree, ws, corpus.token)
    args = argv_for(cmd, c, ws, dst)
    if c.limits:
        return servers.cli(args, ws, env)
    if sample and cmd in SAMPLE_COMMANDS:
        return run_subprocess(["-m", "actfmt", *args], ws, env)
    return run_inprocess(args, ws, env)


@pytest.mark.parametrize(("name", "cmd"), MATRIX, ids=[f"{n}-{c}" for n, c in MATRIX])
def test_crafted(corpus: crafted.Corpus, servers: Servers, name: str, cmd: str) -> None:
    c = corpus.cases[name]
    ws = corpus.ws(name)
    dst = corpus.root / ".dst" / name / cmd
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(ws)
    ran = run_case(corpus, servers, c, cmd, dst)
    after = snapshot(ws)

    problems = common_problems(ran, corpus.token)
    problems += [f"outside the destination: {d}" for d in diff(before, after)]
    if cmd != "open":
        problems += format_problems(cmd, ran)
    if cmd.startswith("validate-") and cmd != "validate-deep":
        problems += codes_problems(cmd, ran, c.expect)
    if cmd == "validate-deep":
        problems += codes_problems(cmd, ran, c.expect_deep)
    if cmd.startswith("convert"):
        problems += [f"destination: {h}" for h in token_in_tree(dst, corpus.token.encode())]
        if "refuse-convert" in c.tags and ran.rc == 0:
            problems.append(f"convert published a copy of damaged data ({', '.join(_published(dst))})")
    if ran.maxrss_kb is not None:
        budget = rss_budget(cmd, corpus, servers)
        if ran.maxrss_kb > budget:
            why = " (it imported torch)" if ran.torch and cmd != "open" else ""
            problems.append(f"peak RSS {ran.maxrss_kb // 1024} MB > {budget // 1024} MB{why}")
    assert not problems, (
        f"{ran.what} -> exit {ran.rc} in {ran.seconds:.1f} s:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + f"\n--- stderr (tail)\n{ran.etext[-1500:]}\n--- stdout (tail)\n{ran.text[-1500:]}"
    )


# -------------------------------------------------------------------------------------------------------------
# as an unprivileged user, in a shared sticky directory (the link and lock cases)

UNPRIV = [n for n, c in crafted.CASES.items() if c.unprivileged and c.kind == "tree"]


@pytest.fixture(scope="session")
def shared(corpus: crafted.Corpus) -> Path:
    """A root-owned sticky world-writable directory (like /tmp) inside the corpus."""
    d = corpus.root / "shared"
    d.mkdir(exist_ok=True)
    d.chmod(0o1777)
    return d


@pytest.mark.parametrize("name", UNPRIV)
def test_crafted_link_unprivileged(corpus: crafted.Corpus, servers: Servers, shared: Path, name: str) -> None:
    """validate, convert --force --to pt and open, as nobody, the workspace copied into a shared sticky
    directory (links kept as they are) and the destination there too: no secret read."""
    c = corpus.cases[name]
    ws = shared / name
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(corpus.ws(name), ws, symlinks=True)
    _readable(ws)
    env = _env(corpus, name)
    problems = []
    before = snapshot(ws)
    for cmd in ("validate-text", "convert-force", "open"):
        dst = shared / f"{name}-{cmd}"
        shutil.rmtree(dst, ignore_errors=True)
        if cmd == "open":
            path, tree = open_target(c, ws)
            ran = servers.open(path, ws, env, unprivileged=True, tree=tree)
        else:
            ran = servers.cli(argv_for(cmd, c, ws, dst), ws, env, unprivileged=True)
        found = common_problems(ran, corpus.token)
        found += format_problems(cmd, ran) if cmd != "open" else []
        if cmd == "validate-text":
            found += codes_problems(cmd, ran, c.expect)
        if cmd == "convert-force":
            found += [f"destination: {h}" for h in token_in_tree(dst, corpus.token.encode())]
        problems += [f"{cmd}: {p}" for p in found]
    problems += [f"outside the destination: {d}" for d in diff(before, snapshot(ws))]
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------------------------
# planted links at the lock, the journal and the partial store (root, then nobody in a sticky directory)

LOCKS = [n for n, c in crafted.CASES.items() if c.kind == "lock"]


def _lock_run(corpus: crafted.Corpus, servers: Servers, name: str, ws: Path, unprivileged: bool) -> list[str]:
    c = corpus.cases[name]
    dst = ws / "dst"
    outside = ws / "outside"
    before = snapshot(ws, skip=(dst,))
    env = _env(corpus, name)
    args = ["convert", str(ws / c.root), str(dst), "--to", "zarr", "-j", "1", "--no-progress"]
    ran = servers.cli(args, ws, env, unprivileged=unprivileged)
    problems = common_problems(ran, corpus.token)
    problems += format_problems("convert", ran)
    problems += [f"outside the destination: {d}" for d in diff(before, snapshot(ws, skip=(dst,)))]
    problems += [h for h in token_in_tree(dst, corpus.token.encode()) if "link out" not in h]
    victim = outside / "victim.txt"
    if victim.exists() and not victim.read_text().startswith(corpus.token):
        problems.append("the victim file was overwritten")
    return problems


@pytest.mark.parametrize("name", LOCKS)
def test_planted_link_root(corpus: crafted.Corpus, servers: Servers, name: str) -> None:
    problems = _lock_run(corpus, servers, name, corpus.ws(name), unprivileged=False)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", LOCKS)
def test_planted_link_unprivileged(corpus: crafted.Corpus, servers: Servers, shared: Path, name: str) -> None:
    """The destination is a sticky world-writable directory owned by root, the planted link root's (so the
    kernel's protected_symlinks would not stop it either); the victim belongs to nobody, who runs convert."""
    kit = crafted.Kit(corpus.root / ".cache", corpus.token)
    base = shared / "locks"
    base.mkdir(exist_ok=True)
    ws = crafted.build_case(base, kit, corpus.cases[name])
    _readable(ws)
    (ws / "dst").chmod(0o1777)
    for p in (ws / "outside").rglob("*"):
        os.lchown(p, NOBODY, NOBODY)
    os.chown(ws / "outside", NOBODY, NOBODY)
    problems = _lock_run(corpus, servers, name, ws, unprivileged=True)
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------------------------------------------------
# destinations that are not stores of the target format: refused, untouched


def _convert_refused(
    corpus: crafted.Corpus, name: str, src: Path, dst: Path, to: str, watch: Path, home: Path | None = None
) -> list[str]:
    """``convert src dst --to to --overwrite`` (in this process, HOME = ``home`` if given) must refuse and leave
    ``watch`` as it was."""
    ws = corpus.ws(name)
    before = snapshot(watch)
    env = _env(corpus, name)
    if home is not None:
        env["HOME"] = str(home)
    ran = run_inprocess(["convert", str(src), str(dst), "--to", to, "--overwrite", "--no-progress"], ws, env)
    problems = common_problems(ran, corpus.token, expect_rc=(1, 2))
    problems += format_problems("convert", ran)
    problems += [f"{watch.name}: {d}" for d in diff(before, snapshot(watch))]
    return [f"convert {src.name} {dst} --to {to} --overwrite -> exit {ran.rc}: {p}" for p in problems] + (
        [f"  stderr: {ran.etext.strip()[-300:]}"] if problems else []
    )


def test_dst_home_with_documents(corpus: crafted.Corpus) -> None:
    """The source holds Documents.zarr: `convert SRC ~ --to pt --overwrite` must not replace ~/Documents (a
    plain directory), neither when DST is HOME nor when it is any directory holding a plain Documents/."""
    name = "dst_documents"
    ws = corpus.ws(name)
    home = ws / "home"
    problems = _convert_refused(corpus, name, ws / "tree", home, "pt", home, home=home)
    thesis = home / "Documents" / "thesis.txt"
    if not thesis.is_file() or thesis.read_text().strip() != corpus.token:
        problems.append("~/Documents/thesis.txt is gone or changed")
    # DST is another directory with a plain Documents/ in it
    plain = ws / "plain"
    shutil.rmtree(plain, ignore_errors=True)
    plain.mkdir()
    (plain / "Documents").mkdir()
    (plain / "Documents" / "thesis.txt").write_text(corpus.token + "\n")
    problems += _convert_refused(corpus, name, ws / "tree", plain, "pt", plain)
    shutil.rmtree(plain)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["dst_user_file", "dst_user_dir", "dst_other_format"])
def test_dst_not_a_store_of_the_format(corpus: crafted.Corpus, name: str) -> None:
    ws = corpus.ws(name)
    problems = _convert_refused(corpus, name, ws / "tree", ws / "dst", "zarr", ws / "dst")
    assert not problems, "\n".join(problems)


class Trapped(BaseException):
    """A write the dry check refused (BaseException: no `except Exception` swallows it)."""


@contextlib.contextmanager
def no_writes() -> Iterator[list[str]]:
    """Every primitive that creates, changes or removes a file raises :class:`Trapped` (and is recorded)."""
    calls: list[str] = []
    saved: list[tuple[Any, str, Any]] = []

    def deny(what: str) -> Any:
        def f(*a: Any, **k: Any) -> Any:
            calls.append(f"{what}({a[0] if a else ''!s})")
            raise Trapped(calls[-1])

        return f

    def patch(mod: Any, attr: str, value: Any) -> None:
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)

    for attr in (
        "unlink",
        "remove",
        "rmdir",
        "rename",
        "replace",
        "mkdir",
        "makedirs",
        "symlink",
        "link",
        "truncate",
        "chmod",
        "chown",
        "removedirs",
        "renames",
        "utime",
        "mkfifo",
    ):
        patch(os, attr, deny(f"os.{attr}"))
    real_isdir = os.path.isdir

    def mkdir(path: Any, *a: Any, **k: Any) -> Any:  # an existing directory: nothing changes, allowed
        if real_isdir(path):
            raise FileExistsError(17, "File exists", str(path))
        return deny("os.mkdir")(path)

    def makedirs(path: Any, mode: int = 0o777, exist_ok: bool = False) -> Any:
        if real_isdir(path):
            if exist_ok:
                return None
            raise FileExistsError(17, "File exists", str(path))
        return deny("os.makedirs")(path)

    os.mkdir, os.makedirs = mkdir, makedirs  # restored with the others (saved above)
    for attr in ("rmtree", "move", "copytree", "copy", "copy2", "copyfile"):
        patch(shutil, attr, deny(f"shutil.{attr}"))
    real_os_open, real_open = os.open, io.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path: Any, flags: int, *a: Any, **k: Any) -> Any:
        if flags & writing:
            deny("os.open")(path)
        return real_os_open(path, flags, *a, **k)

    def py_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        if isinstance(file, (str, bytes, os.PathLike)) and any(ch in mode for ch in "wax+"):
            deny("open")(file)
        return real_open(file, mode, *a, **k)

    patch(os, "open", os_open)
    patch(io, "open", py_open)
    patch(builtins, "open", py_open)
    try:
        yield calls
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def test_dst_root_and_home_refused_dry(corpus: crafted.Corpus) -> None:
    """DST=/ is refused at planning, and so is a split whose destination would be the home directory itself
    (HOME=.../home/EM, `convert tree .../home --overwrite` with tree/EM): checked in this process with every
    write primitive trapped (a conversion that got as far as a lock, a file or a new directory fails the test,
    touching nothing)."""

    ws = corpus.ws("dst_root")
    problems = []
    old = os.environ.get("HOME")
    fake_home = ws / "home" / "EM"
    fake_home.mkdir(parents=True, exist_ok=True)
    (fake_home / "notes.txt").write_text(corpus.token + "\n")
    os.environ["HOME"] = str(fake_home)
    try:
        for dst in ("/", "//", "/./", str(fake_home.parent)):
            with no_writes() as calls:
                try:
                    actfmt_convert(ws / "tree", dst, to="pt", overwrite=True, jobs=1)
                    problems.append(f"convert(tree, {dst!r}, overwrite=True) returned: not refused")
                except Trapped:
                    problems.append(f"DST={dst!r}: not refused at planning: it tried {calls[0]}")
                except ActfmtError as exc:
                    if calls:
                        problems.append(f"DST={dst!r}: refused ({exc}) but only after trying {calls[0]}")
                except Exception as exc:
                    problems.append(f"DST={dst!r}: {type(exc).__name__}: {exc} (not an ActfmtError)")
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old
    if (fake_home / "notes.txt").read_text().strip() != corpus.token:
        problems.append("the fake home's notes.txt changed")
    assert not problems, "\n".join(problems)


def test_collision_refused_at_planning(corpus: crafted.Corpus) -> None:
    """EM/ and EM.zarr in one source both map to DST/EM with --to pt: refused before anything is written."""
    name = "collision_em_zarr"
    ws = corpus.ws(name)
    dst = corpus.root / ".dst" / name / "collide"
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    before = snapshot(ws)
    ran = run_inprocess(
        ["convert", str(ws / "tree"), str(dst), "--to", "pt", "--overwrite", "--no-progress"],
        ws,
        _env(corpus, name),
    )
    problems = common_problems(ran, corpus.token, expect_rc=(1, 2))
    problems += [f"outside the destination: {d}" for d in diff(before, snapshot(ws))]
    if _published(dst):
        problems.append(f"published {_published(dst)} although two sources map to one destination")
    assert not problems, f"exit {ran.rc}\n" + "\n".join(problems) + f"\n{ran.etext[-800:]}\n{ran.text[-400:]}"


# -------------------------------------------------------------------------------------------------------------
# object storage that never answers


def test_remote_silent_endpoint(corpus: crafted.Corpus) -> None:
    """An S3 endpoint that accepts connections and never answers: validate ends with a clear error that says
    it timed out.  The timeouts are set short through their documented environment variables
    (ACTFMT_CONNECT_TIMEOUT / ACTFMT_READ_TIMEOUT) so the test takes seconds, not the default's minute."""
    pytest.importorskip("s3fs")
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    port = srv.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.5)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = srv.accept()
                held.append(conn)  # never answered, never closed

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    env = {
        **_env(corpus, "remote_silent_endpoint"),
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "ACTFMT_CONNECT_TIMEOUT": "1",
        "ACTFMT_READ_TIMEOUT": "1",
    }
    kill_after = 40.0
    try:
        ran = run_subprocess(
            [
                "-m",
                "actfmt",
                "validate",
                "s3://bucket/Activations",
                "--no-progress",
                "--storage-options",
                json.dumps({"endpoint_url": f"http://127.0.0.1:{port}"}),
            ],
            corpus.ws("remote_silent_endpoint"),
            env,
            timeout=kill_after,
        )
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    problems = common_problems(ran, corpus.token, expect_rc=(1, 2))
    if not ran.killed and "time" not in ran.etext.lower():
        problems.append("the error does not say it timed out")
    assert not problems, (
        f"{ran.seconds:.1f} s, exit {ran.rc}\n" + "\n".join(problems) + f"\n{ran.etext[-800:]}"
    )
