import pytest

from autocompress.errors import BudgetError, UserInputError
from autocompress.hwmodels import Budget, parse_budget


@pytest.mark.parametrize("text, field, value", [
    ("5ms", "latency_ms", 5.0), ("5 ms", "latency_ms", 5.0), ("800us", "latency_ms", 0.8),
    ("0.005s", "latency_ms", 5.0), ("2mJ", "energy_mj", 2.0), ("4MB", "size_bytes", 4_000_000),
    ("4MiB", "size_bytes", 4 * 2 ** 20), ("0.5x", "relative", 0.5), ("1.5 ms", "latency_ms", 1.5),
])
def test_single_limits(text, field, value):
    b = parse_budget(text)
    assert getattr(b, field) == pytest.approx(value, rel=1e-12)
    others = {"latency_ms", "energy_mj", "size_bytes", "relative"} - {field}
    assert all(getattr(b, f) is None for f in others)


def test_combination():
    b = parse_budget("5ms, 2mJ,4MiB")
    assert (b.latency_ms, b.energy_mj, b.size_bytes, b.relative) == (5.0, 2.0, 4 * 2 ** 20, None)
    assert b.to_json() == {"latency_ms": 5.0, "energy_mj": 2.0, "size_bytes": 4 * 2 ** 20}


@pytest.mark.parametrize("text, bad", [
    ("5", "'5'"), ("fast", "'fast'"), ("5 parsecs", "parsecs"), ("-1ms", "'-1ms'"), ("0ms", "'0ms'"),
    ("5ms,6ms", "'6ms'"), ("5ms,,2mJ", "''"), ("", "empty"), ("5ms;2mJ", "'5ms;2mJ'"),
])
def test_rejects_with_one_line_naming_the_bad_part(text, bad):
    with pytest.raises(BudgetError) as err:
        parse_budget(text)
    msg = str(err.value)
    assert "\n" not in msg
    assert bad in msg
    assert "5ms" in msg and "4MiB" in msg and "0.5x" in msg  # the accepted forms are listed
    assert isinstance(err.value, UserInputError) and err.value.exit_code == 2


def test_relative_resolves_against_the_baseline():
    b = parse_budget("0.5x").resolved(12.0)
    assert b.latency_ms == pytest.approx(6.0) and b.relative is None
    both = parse_budget("0.5x,5ms").resolved(12.0)
    assert both.latency_ms == pytest.approx(5.0)  # the tighter limit wins
    assert parse_budget("3ms").resolved(100.0) == parse_budget("3ms")


def test_violations_and_is_met():
    b = Budget(latency_ms=5.0, energy_mj=2.0, size_bytes=1000)
    assert b.violations(latency_ms=4.0, energy_mj=2.0, size_bytes=999) == {}
    assert b.is_met(latency_ms=5.0, energy_mj=1.0, size_bytes=1000)
    v = b.violations(latency_ms=6.0, energy_mj=1.0, size_bytes=1500)
    assert v == pytest.approx({"latency_ms": 0.2, "size_bytes": 0.5})
    assert not b.is_met(latency_ms=6.0)
    # A limit whose value is not given is not judged.
    assert Budget(latency_ms=1.0).violations(energy_mj=100.0) == {}


def test_relative_budget_must_be_resolved_before_judging():
    with pytest.raises(BudgetError):
        parse_budget("0.5x").violations(latency_ms=1.0)


def test_to_json_lists_only_set_limits():
    assert parse_budget("2mJ").to_json() == {"energy_mj": 2.0}
    assert parse_budget("0.5x").resolved(8.0).to_json() == {"latency_ms": 4.0}


def test_a_latency_scale_tightens_only_the_latency_limit():
    b = Budget(latency_ms=4.0, energy_mj=2.0, size_bytes=1000)
    tight = b.with_latency_scale(0.5)
    assert tight == Budget(latency_ms=2.0, energy_mj=2.0, size_bytes=1000)
    assert tight.violations(latency_ms=3.0) == pytest.approx({"latency_ms": 0.5})
    assert b.with_latency_scale(1.0) is b
    assert Budget(energy_mj=2.0).with_latency_scale(0.5) == Budget(energy_mj=2.0)  # no latency limit to scale
    with pytest.raises(BudgetError):
        parse_budget("0.5x").with_latency_scale(0.5)
