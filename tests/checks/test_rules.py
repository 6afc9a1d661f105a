"""Meta-tests over the rule catalogue: codes, names, severities, documentation, a fixture for each rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from actfmt.checks import RULES, UnknownRuleError, get_rule, resolve_selection
from actfmt.checks.base import SEVERITIES
from actfmt.errors import ActfmtError
from tests.conftest import INVALID

#: The catalogue of issue 2 (the contract): code -> (name, severity).
CATALOGUE = {
    "ACT001": ("unreadable-file", "error"),
    "ACT002": ("corrupt-shard", "error"),
    "ACT003": ("unsafe-shard", "error"),
    "ACT004": ("not-a-tensor", "error"),
    "ACT101": ("missing-metadata", "error"),
    "ACT102": ("missing-layer", "error"),
    "ACT103": ("extra-layer", "error"),
    "ACT104": ("bad-name", "error"),
    "ACT105": ("stray-file", "warning"),
    "ACT201": ("metadata-unparseable", "error"),
    "ACT202": ("metadata-missing-key", "error"),
    "ACT203": ("metadata-bad-value", "error"),
    "ACT204": ("metadata-path-mismatch", "warning"),
    "ACT301": ("shard-count", "error"),
    "ACT302": ("missing-shard", "error"),
    "ACT303": ("shard-rows", "error"),
    "ACT304": ("last-shard-rows", "error"),
    "ACT305": ("total-rows", "error"),
    "ACT306": ("extra-shard", "error"),
    "ACT401": ("not-2d", "error"),
    "ACT402": ("hidden-dim", "error"),
    "ACT403": ("dtype-unsupported", "error"),
    "ACT404": ("dtype-mixed", "error"),
    "ACT405": ("bloated-shard", "warning"),
    "ACT406": ("non-finite", "error"),
    "ACT407": ("zero-rows", "warning"),
    "ACT501": ("duplicate-layer", "error"),
    "ACT502": ("split-mismatch", "warning"),
}
#: Rules added since: code -> (name, severity).
ADDED = {
    "ACT005": ("unfollowed-link", "error"),  # a cycle: a warning
    "ACT006": ("special-file", "error"),
    "ACT007": ("external-data", "error"),
    "ACT205": ("metadata-missing-producer-key", "warning"),
    "ACT408": ("norm-outlier", "warning"),
    "ACT503": ("identical-splits", "error"),
}
FIXTURE_CODES = {p.name.split("_")[0] for p in INVALID.iterdir() if p.is_dir()}
#: Rules whose broken input git cannot hold (a FIFO): the test that makes it at run time, by file.
RUNTIME_FIXTURES = {"ACT006": "test_engine.py"}


def test_catalogue_is_exactly_the_contract() -> None:
    core = {code: (r.name, r.severity) for code, r in RULES.items() if code in CATALOGUE}
    assert core == CATALOGUE
    assert list(RULES) == sorted(RULES)
    added = {code: (r.name, r.severity) for code, r in RULES.items() if code in ADDED}
    assert added == ADDED
    extra = set(RULES) - set(CATALOGUE) - set(ADDED)
    assert all(re.fullmatch(r"ACT6\d\d", c) for c in extra), extra  # and converted-store rules


@pytest.mark.parametrize("code", sorted(RULES))
def test_rule_is_documented_and_well_formed(code: str) -> None:
    rule = RULES[code]
    assert rule.code == code and re.fullmatch(r"ACT\d{3}", code)
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rule.name)
    assert rule.severity in SEVERITIES
    doc = rule.documentation()
    title = rule.title()
    assert title and len(title) <= 120 and not title.endswith(",")
    assert len(doc.splitlines()) >= 3, f"{code}: the docstring needs a title and an explanation"
    assert "Fix" in doc, f"{code}: the documentation says how to fix it"


@pytest.mark.parametrize("code", sorted(RULES))
def test_every_rule_has_an_invalid_fixture(code: str) -> None:
    if code.startswith("ACT6"):
        # converted-store rules: broken stores are generated (convert + one mutation) in test_stores.py
        stores_tests = (Path(__file__).parent / "test_stores.py").read_text(encoding="utf-8")
        assert f'("{code}", f"{{DS}}/' in stores_tests, code
        return
    if code in RUNTIME_FIXTURES:
        text = (Path(__file__).parent / RUNTIME_FIXTURES[code]).read_text(encoding="utf-8")
        assert f'"{code}"' in text, code
        return
    assert code in FIXTURE_CODES


def test_every_fixture_names_an_existing_rule() -> None:
    assert set(RULES) >= FIXTURE_CODES
    for p in INVALID.iterdir():
        if p.is_dir():
            assert re.fullmatch(r"ACT\d{3}_[a-z0-9_]+", p.name), p.name


def test_names_are_unique() -> None:
    names = [r.name for r in RULES.values()]
    assert len(names) == len(set(names))


def test_get_rule_by_code_or_name() -> None:
    assert get_rule("ACT302").name == "missing-shard"
    assert get_rule("act302") is get_rule("missing-shard")
    with pytest.raises(UnknownRuleError, match="ACT999") as info:
        get_rule("ACT999")
    assert isinstance(info.value, ActfmtError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown rule 'ACT999'")


def test_resolve_selection() -> None:
    assert resolve_selection(None, None) == set(RULES)
    assert resolve_selection(["ACT3"], None) == {c for c in RULES if c.startswith("ACT3")}
    assert resolve_selection("ACT302,stray-file", None) == {"ACT302", "ACT105"}
    assert resolve_selection(None, ["ACT4", "missing-shard"]) == {
        c for c in RULES if not c.startswith("ACT4") and c != "ACT302"
    }
    assert resolve_selection(["ALL"], ["ACT"]) == set()
    assert resolve_selection(["ACT30"], ["ACT306"]) == {"ACT301", "ACT302", "ACT303", "ACT304", "ACT305"}


@pytest.mark.parametrize("bad", ["ACT999", "ACT9", "missing-shards", "E501", ""])
def test_resolve_selection_rejects_unknown(bad: str) -> None:
    if not bad:
        assert resolve_selection([bad], None) == set(RULES)  # an empty item is no item
        return
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        resolve_selection([bad], None)
    with pytest.raises(ActfmtError, match=re.escape(repr(bad))):
        resolve_selection(None, bad)
