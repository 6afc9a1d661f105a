#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel (the wheel from the sdist), install the wheel alone
# into a fresh virtual environment outside the repository, and run there what a user runs: `actfmt --version`,
# `validate` (a good and a broken tree), `convert` + `verify` + `info`, and the commands of the README's
# "Use in CI" recipes as written.  A module missing from the wheel, a missing py.typed, or anything that needs
# the repository's layout fails here.
#
# Usage: scripts/check_wheel.sh [PYTHON]     PYTHON builds and makes the venv (default: .venv/bin/python)
# Environment: TORCH_SPEC (default torch==2.13.0, as in the Makefile: installed first so that the wheel's
# torch>=2.10 does not pull a CUDA build); KEEP=1 keeps the temporary directory.  pip's cache is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${1:-.venv/bin/python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/actfmt-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  echo "check_wheel: keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() {
  echo "check_wheel: FAILED: $*" >&2
  exit 1
}

step "build the sdist and the wheel"
"$PY" -m build --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 || {
  cat "$WORK/build.log"
  fail "python -m build"
}
if grep -i -E "deprecat|SetuptoolsWarning|_DeprecatedConfig" "$WORK/build.log"; then
  fail "the build warns (see above)"
fi
SDIST=$(ls "$WORK"/dist/actfmt-*.tar.gz)
WHEEL=$(ls "$WORK"/dist/actfmt-*.whl)
# the pure-Python wheel too (no compiled kernel): the one the README's CI recipes install
ACTFMT_PURE=1 "$PY" -m build --wheel --outdir "$WORK/pure" . >"$WORK/build-pure.log" 2>&1 || {
  cat "$WORK/build-pure.log"
  fail "ACTFMT_PURE=1 python -m build --wheel"
}
PURE_WHEEL=$(ls "$WORK"/pure/actfmt-*-py3-none-any.whl)
echo "$(basename "$SDIST")  $(basename "$WHEEL")  $(basename "$PURE_WHEEL")"

step "the wheel is as small as the README says"
# README, "Use in CI": "(under N kB)"; the figure a user reads is checked on every build.
SAID=$(grep -o -E '\(under [0-9]+ kB\)' README.md | grep -o -E '[0-9]+' | head -1)
SIZE=$(($(stat -c %s "$PURE_WHEEL") / 1000))  # the one the README names
[ -n "$SAID" ] || fail "README.md no longer says how large the wheel is ('(under N kB)' after its name)"
[ "$SIZE" -lt "$SAID" ] || fail "the wheel is $SIZE kB; README.md says under $SAID kB"
echo "wheel: $SIZE kB (README: under $SAID kB)"

step "the wheel holds every module, py.typed and the licence; its metadata is complete"
# Every file of the package that git tracks (or, outside git, every .py file and py.typed under src/actfmt).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files src/actfmt >"$WORK/tracked"
else
  (find src/actfmt -name '*.py' -o -name py.typed) | sort >"$WORK/tracked"
fi
"$PY" - "$WHEEL" "$SDIST" "$WORK/tracked" <<'PY'
import sys
import tarfile
import zipfile
from email.parser import Parser

wheel, sdist, tracked = sys.argv[1:4]
names = set(zipfile.ZipFile(wheel).namelist())
want = {line.strip().removeprefix("src/") for line in open(tracked) if line.strip()}
want = {n for n in want if n.endswith(".py") or n.endswith("py.typed")}
missing = sorted(want - names)
assert not missing, f"files missing from the wheel: {missing}"
assert "actfmt/py.typed" in names, "no py.typed in the wheel"
assert [n for n in names if n.startswith("actfmt/_kernel") and n.endswith(".so")], "no compiled kernel in the wheel"
info = next(n for n in names if n.endswith(".dist-info/METADATA"))
meta = Parser().parsestr(zipfile.ZipFile(wheel).read(info).decode())
assert meta["License-Expression"] == "MIT", meta["License-Expression"]
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "no LICENSE in the wheel"
assert meta["Requires-Python"] == ">=3.11", meta["Requires-Python"]
classifiers = meta.get_all("Classifier") or []
assert "Typing :: Typed" in classifiers, classifiers
assert not [c for c in classifiers if c.startswith("License ::")], "license classifiers are superseded (PEP 639)"
members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
for need in ("pyproject.toml", "README.md", "LICENSE", "src/actfmt/py.typed", "src/actfmt/cli.py"):
    assert need in members, f"{need} missing from the sdist"
print(f"{len(want)} package files in the wheel; {meta['Name']} {meta['Version']}, License-Expression MIT, "
      f"{len(classifiers)} classifiers")
PY

step "a fresh virtual environment outside the repository: $TORCH_SPEC, then the wheel"
VENV="$WORK/venv"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL"
ACTFMT="$VENV/bin/actfmt"

USER_DIR="$WORK/user"
mkdir -p "$USER_DIR"
cp -R "$REPO/fixtures/valid/real_minilm_bf16_slice/Activations" "$USER_DIR/Activations"
cp -R "$REPO/fixtures/invalid/ACT302_missing_middle_shard" "$USER_DIR/broken"
cd "$USER_DIR"
unset PYTHONPATH
export NO_COLOR=1

step "actfmt comes from the venv, not from the repository"
where=$("$VENV/bin/python" -c 'import actfmt; print(actfmt.__file__)')
echo "$where"
case "$where" in
  "$VENV"/*) ;;
  *) fail "actfmt was imported from $where" ;;
esac
"$VENV/bin/python" -c 'import importlib.resources as r; assert r.files("actfmt").joinpath("py.typed").is_file()'
"$VENV/bin/python" -c 'from actfmt import kernel; assert kernel.compiled(), "the compiled kernel is not used"'

run() {
  printf '$ %s\n' "$*"
  "$@"
}
expect() { # expect STATUS CMD...: run CMD, fail unless it exits with STATUS
  local want=$1
  shift
  printf '$ %s   (expect exit %s)\n' "$*" "$want"
  set +e
  "$@"
  local got=$?
  set -e
  [ "$got" = "$want" ] || fail "'$*' exited $got, not $want"
}

step "the commands a user runs"
version=$(basename "$WHEEL" | cut -d- -f2)
run "$ACTFMT" --version | tee "$WORK/version"
grep -q "version $version" "$WORK/version" || fail "actfmt --version does not say $version"
run "$ACTFMT" --help >/dev/null
run "$ACTFMT" validate Activations
expect 1 "$ACTFMT" validate broken
run "$ACTFMT" convert Activations out/zarr --to zarr --no-progress
run "$ACTFMT" convert out/zarr out/back --to pt -q
run "$ACTFMT" verify Activations out/zarr
run "$ACTFMT" verify Activations out/back --output-format json >/dev/null
run "$ACTFMT" validate out/zarr out/back
COLUMNS=80 run "$ACTFMT" info out/zarr
run "$ACTFMT" info out/zarr --output-format json >/dev/null
mkdir -p empty
expect 2 "$ACTFMT" info empty
"$VENV/bin/python" - <<'PY'
import actfmt

with actfmt.open("out/zarr/sentence-transformers_all-MiniLM-L6-v2/SP_stdlib_docs_sample/EM.zarr") as split:
    x = split.layer(1)[[5, 1, 5]]
    print("actfmt.open:", split.format, tuple(x.shape), x.dtype)
PY

step "the README's CI recipes, as written (from a checkout holding Activations/ and the wheel)"
mkdir -p ci
cp "$PURE_WHEEL" ci/
ln -s "$VENV" .venv # the Jenkins recipe's .venv/bin/actfmt
"$VENV/bin/python" - "$REPO/README.md" "$(basename "$PURE_WHEEL")" >"$WORK/recipes.sh" <<'PY'
"""The install and actfmt lines of README's "Use in CI" section, as shell commands for the check's venv."""
import re
import shlex
import sys

readme, wheel = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
section = readme.split("\n## Use in CI\n", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```[a-z]*\n(.*?)```", section, flags=re.DOTALL)
wheels = set(re.findall(r"ci/actfmt-[^\s'\"\]]+\.whl", section))
assert wheels == {f"ci/{wheel}"}, f"the recipes name {sorted(wheels)}, the build made ci/{wheel}"
out = []
for block in blocks:
    for raw in block.splitlines():
        line = raw.split(" #")[0].strip()
        line = re.sub(r"^(-\s+)?(run:\s*)?(sh\s+)?", "", line).strip().strip("'\"")
        if re.search(r"(^|/)pip install .*ci/actfmt-.*\.whl", line):
            out.append('"$VENV/bin/python" -m pip install -q --disable-pip-version-check ' + line.split("install", 1)[1].strip())
        elif re.match(r"(\.venv/bin/)?actfmt validate ", line):
            out.append(line)
    # pre-commit: entry + args
    entry = re.search(r"entry:\s*(.+)", block)
    args = re.search(r"args:\s*\[(.*)\]", block)
    if entry and args and "actfmt validate" in entry.group(1):
        out.append(entry.group(1).strip() + " " + " ".join(shlex.quote(a.strip()) for a in args.group(1).split(",")))
assert sum("actfmt validate" in line for line in out) >= 4, out
print("\n".join(out))
PY
export VENV PATH="$VENV/bin:$PATH"
while IFS= read -r line; do
  printf '$ %s\n' "$line"
  set +e
  bash -c "$line"
  status=$?
  set -e
  # Jenkins' recipe passes --exit-zero; the others exit 0 on this valid tree.
  [ "$status" = 0 ] || fail "recipe command exited $status: $line"
done <"$WORK/recipes.sh"
for report in actfmt-junit.xml; do
  [ -s "$report" ] || fail "the recipes wrote no $report"
  "$VENV/bin/python" -c "import sys, xml.etree.ElementTree as ET; ET.parse(sys.argv[1])" "$report"
done

printf '\ncheck_wheel: OK in %ss (%s)\n' "$((SECONDS - START))" "$(basename "$WHEEL")"
