"""Documentation stays true: help on every command and option, docs on every rule, README in step with the code."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from actfmt.checks import RULES
from actfmt.checks.base import SEVERITIES
from actfmt.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "scripts"))
import gen_rules_table  # noqa: E402

COMMANDS = sorted(cli.commands)


def _readme() -> str:
    return README.read_text(encoding="utf-8")


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_and_option_has_help(name: str) -> None:
    command = cli.commands[name]
    assert command.help and command.help.strip(), f"`actfmt {name}` has no help"
    assert command.get_short_help_str().strip()
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"`actfmt {name} {param.opts[0]}` has no help"


def test_group_has_help() -> None:
    assert cli.help and "activation" in cli.help


@pytest.mark.parametrize("code", sorted(RULES))
def test_every_rule_is_documented(code: str) -> None:
    rule = RULES[code]
    assert re.fullmatch(r"ACT\d{3}", rule.code) and rule.code == code
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rule.name), rule.name
    assert rule.severity in SEVERITIES
    title = rule.title()
    assert title and title.endswith("."), f"{code}: the docstring's first line is its title, ending with '.'"
    body = rule.documentation()[len(title) :].strip()
    assert len(body) >= 40, f"{code}: documentation must explain the problem and the fix, not only a title"


def test_rule_names_are_unique() -> None:
    names = [r.name for r in RULES.values()]
    assert len(names) == len(set(names))


def test_readme_rule_table_matches_registry() -> None:
    assert gen_rules_table.readme_table(_readme()) == gen_rules_table.rules_table(), (
        "README.md is out of date: run python scripts/gen_rules_table.py --write"
    )


def test_readme_sections_and_setup_commands() -> None:
    text = _readme()
    for heading in ("## Validate", "## Rules", "## Use in CI"):
        assert heading in text.splitlines()
    assert "make demo" in text and "make test" in text
    for name in COMMANDS:
        if name in ("validate", "rules", "rule"):
            assert f"actfmt {name}" in text, f"README lacks an example of `actfmt {name}`"


def _readme_commands() -> list[list[str]]:
    """Every `actfmt ...` command line in README code blocks, as argv lists (without `actfmt`)."""
    found = []
    for block in _code_blocks(_readme()):
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split(" #")[0].strip().lstrip("-").strip().strip("'\"")
            match = re.search(
                r"(?:^|\s|run:\s*|\.venv/bin/|python -m )actfmt\s+(validate|rules|rule)\b(.*)", line
            )
            if match and not re.match(r"(entry|name):", line):
                found.append([match.group(1), *shlex.split(match.group(2).strip().rstrip("'\""))])
    return found


def test_readme_command_lines_parse() -> None:
    commands = _readme_commands()
    assert len(commands) >= 8
    for argv in commands:
        command = cli.commands[argv[0]]
        args = [a for a in argv[1:] if a not in ("||", "true")]
        try:
            command.make_context(argv[0], list(args), resilient_parsing=False)
        except click.BadParameter as exc:  # a path that exists only in the user's tree is fine
            assert "does not exist" in str(exc), (argv, exc)
        except click.UsageError as exc:
            pytest.fail(f"README command `actfmt {' '.join(argv)}` does not parse: {exc}")


def test_readme_ci_examples_use_the_right_formats() -> None:
    commands = [" ".join(argv) for argv in _readme_commands()]
    assert any("--output-format github" in c for c in commands)
    assert sum("--output-format junit" in c for c in commands) >= 2  # GitLab and Jenkins
    text = _readme()
    assert "reports:\n        junit:" in text or "junit: actfmt-junit.xml" in text
    assert "junit '" in text or 'junit "' in text  # Jenkins' junit step


def test_pre_commit_hook_definition() -> None:
    text = (ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8")
    fields = dict(re.findall(r"^\s*-?\s*(\w+):\s*(.+?)\s*$", text, flags=re.MULTILINE))
    assert fields["id"] == "actfmt-validate"
    assert fields["entry"] == "actfmt validate"
    assert fields["language"] == "python"
    assert fields["pass_filenames"] == "false"
    assert "id: actfmt-validate" in _readme()


def test_gen_rules_table_check_mode() -> None:
    assert gen_rules_table.main(["--check"]) == 0


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_install_recipes_work_before_a_release() -> None:
    """No release is on the package index: recipes install the built wheel; `pip install actfmt` is labelled."""
    from actfmt import __version__

    text = _readme()
    wheel = f"actfmt-{__version__}-py3-none-any.whl"
    for heading in ("## Set up", "## Use in CI"):
        section = _section(text, heading)
        assert wheel in section, f"{heading}: no install of {wheel}"
        assert set(re.findall(r"actfmt-[0-9][^\s'\"\]\[]*\.whl", section)) == {wheel}
        for block in _code_blocks(section):
            for line in block.splitlines():
                if re.search(r"pip install [\"']?actfmt\b", line) or "actfmt==" in line:
                    assert "after a release" in line, f"{heading}: unlabelled index install: {line.strip()}"
        for pinned in re.findall(r"actfmt==([0-9][^\"'\s]*)", section):
            assert pinned == __version__
    ci = _section(text, "## Use in CI")
    assert ci.count(f"pip install ci/{wheel}") >= 3  # GitHub Actions, GitLab, Jenkins
    assert "language: system" in ci and "rev:" in ci  # pre-commit: today, and from the git repository
    assert "requires-python" in _section(text, "## Set up")  # why no upper bound


def test_makefile_keeps_the_two_setup_commands_and_builds_the_wheel() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo:", "test:", "dist:", "check-wheel:"):
        assert f"\n{target}" in makefile
    assert "make check-wheel" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
