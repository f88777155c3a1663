"""--kinds: a search restricted to some decision kinds chooses only those, and says so; bad kinds are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli
from tests.test_tasks import TOKENS


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kinds") / "tokens.py"
    path.write_text(TOKENS)
    return path


def _args(tokens: Path, out: Path, *extra: str, budget: str = "0.9x") -> list[str]:
    return ["search", "--model", f"{tokens}:model", "--task", f"{tokens}:task", "--target", "mobile", "--budget",
            budget, "--trials", "2", "--low-epochs", "0.2", "--full-epochs", "0.2", "--finalists", "1",
            "--no-measure", "--out", str(out), *extra]


def test_a_search_of_some_kinds_chooses_only_those_and_its_folder_remembers_them(tokens: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = run_cli(*_args(tokens, out, "--kinds", "abits, wbits"))
    assert res.exit_code == 0, res.output
    result = json.loads((out / "result.json").read_text())
    assert result["decision_kinds"] == ["abits", "wbits"]
    assert "Decision kinds searched: abits, wbits." in (out / "report.md").read_text()
    decisions = json.loads((out / "policy.json").read_text())["decisions"]
    assert decisions, "the budget needs some compression"
    assert {d.split(":")[0] for d in decisions} <= {"wbits", "abits"}, decisions
    assert json.loads((out / "search.json").read_text())["kinds"] == ["wbits", "abits"]

    refused = run_cli(*_args(tokens, out, "--kinds", "prune"))
    assert_one_line_error(refused, "holds another search", "kinds", "--force")


@pytest.mark.parametrize("kinds, fragments", [
    ("prune,pruning", ("unknown decision kind(s) 'pruning'", "valid: prune, wbits")),
    (" , ", ("--kinds is empty", "--kinds prune,wbits,abits")),
    ("heads", ("--kinds heads leaves no decision", "its decision kinds are:", "wbits")),
])
def test_bad_kinds_are_one_line_errors(tokens: Path, tmp_path: Path, kinds: str, fragments: tuple[str, ...]):
    out = tmp_path / "out"
    assert_one_line_error(run_cli(*_args(tokens, out, "--kinds", kinds)), *fragments)
    assert not (out / "result.json").exists()


def test_the_study_name_and_the_config_spell_kinds_one_way():
    from autocompress.errors import UserInputError
    from autocompress.search.core import SearchConfig, study_name_for

    a = SearchConfig(kinds=("wbits", "prune"))
    assert a.kinds == ("prune", "wbits") == SearchConfig(kinds="prune, wbits").kinds  # the Python API's string too
    assert study_name_for("fp", a) == study_name_for("fp", SearchConfig(kinds=("prune", "wbits")))
    assert study_name_for("fp", a) != study_name_for("fp", SearchConfig())
    assert study_name_for("fp", SearchConfig()) == study_name_for("fp", SearchConfig(kinds=()))
    with pytest.raises(UserInputError, match="unknown decision kind"):
        SearchConfig(kinds=("prune", "int4"))
