"""Policies: round trip, validation against the space, and the errors a user sees."""

from __future__ import annotations

import json
import random
from types import MappingProxyType

import pytest

from autocompress.compress import PRIMITIVES
from autocompress.errors import PolicyError
from autocompress.models import BUILTIN_MODELS
from autocompress.space.policy import FORMAT, Policy
from conftest import workspace

BUILTINS = [f"builtin:{n}" for n in BUILTIN_MODELS.names()]
ENCODER_ONLY = ("heads", "drop")  # transformer primitives: the built-in CNNs offer none (see test_transformers)
CASES = [(spec, prim) for spec in BUILTINS for prim in PRIMITIVES.names() if prim not in ENCODER_ONLY]


def _policy_for(space, kinds, seed=0) -> Policy:
    """Every decision of ``kinds`` at a seeded random non-identity choice."""
    rng = random.Random(seed)
    picks = {}
    for d in space.decisions:
        if d.kind in kinds:
            picks[d.id] = rng.choice([c for c in d.choices if c != d.identity])
    return Policy(space.model, space.fingerprint, picks, space.options)


@pytest.mark.parametrize("spec, primitive", CASES)
def test_round_trip(tmp_path, spec, primitive):
    space = workspace(spec).space
    kinds = PRIMITIVES.get(primitive).kinds
    policy = _policy_for(space, kinds)
    assert policy.decisions, f"{primitive} offers no decision on {spec}"
    path = tmp_path / "policy.json"
    policy.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["model"] == spec and data["fingerprint"] == space.fingerprint
    assert data["decisions"] == dict(policy.decisions)
    loaded = Policy.load(path)
    assert loaded == policy
    assert loaded.validate(space) is loaded
    assert loaded.non_identity(space) == dict(policy.decisions)
    resolved = loaded.resolved(space)
    assert set(resolved) == {d.id for d in space.decisions}
    assert all(resolved[d.id] == d.identity for d in space.decisions if d.kind not in kinds)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


@pytest.mark.parametrize("spec, primitive", CASES)
def test_out_of_domain_value_is_named(spec, primitive):
    space = workspace(spec).space
    d = next(d for d in space.decisions if d.kind in PRIMITIVES.get(primitive).kinds)
    bad = Policy(spec, space.fingerprint, {d.id: 0.3333}, space.options)
    with pytest.raises(PolicyError) as exc:
        bad.validate(space)
    msg = str(exc.value)
    assert f"{d.id}=0.3333" in msg and str(list(d.choices)) in msg and "\n" not in msg


@pytest.mark.parametrize("spec", BUILTINS)
def test_unknown_ids_are_named(spec):
    space = workspace(spec).space
    bad = Policy(spec, space.fingerprint, {"prune:no.such.layer": 0.5, "wbits:nowhere": 8}, space.options)
    with pytest.raises(PolicyError) as exc:
        bad.validate(space)
    assert "'prune:no.such.layer'" in str(exc.value) and "'wbits:nowhere'" in str(exc.value)


@pytest.mark.parametrize("spec", BUILTINS)
def test_policy_of_another_model_is_rejected(spec):
    mine = workspace(spec).space
    other = workspace("torchvision:resnet18", (1, 3, 64, 64)).space
    foreign = _policy_for(other, ("prune",))
    with pytest.raises(PolicyError) as exc:
        foreign.validate(mine)
    msg = str(exc.value)
    assert "fingerprint" in msg and other.fingerprint in msg and mine.fingerprint in msg
    assert "torchvision:resnet18" in msg and "another architecture" in msg
    # same decision ids but another fingerprint (e.g. another input size) is still another architecture
    moved = Policy(spec, "0" * 16, _policy_for(mine, ("rank",)).decisions, mine.options)
    with pytest.raises(PolicyError, match="fingerprint 0000000000000000"):
        moved.validate(mine)
    assert moved.validate(mine, check_fingerprint=False) is moved


def test_options_must_match():
    space = workspace("builtin:digits-net").space
    policy = Policy(space.model, space.fingerprint, {}, {"prune_round_to": 8})
    with pytest.raises(PolicyError, match="options"):
        policy.validate(space)


def test_identity_policy_and_immutability():
    space = workspace("builtin:digits-net").space
    policy = Policy.identity(space)
    assert policy.validate(space).non_identity(space) == {}
    assert isinstance(policy.decisions, MappingProxyType)
    with pytest.raises(TypeError):
        policy.decisions["prune:fc1"] = 0.5  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.model = "x"  # type: ignore[misc]
    # the caller's dict is copied, not shared
    src = {"prune:fc1": 0.5}
    p = Policy(space.model, space.fingerprint, src)
    src["prune:fc1"] = 0.75
    assert p.decisions["prune:fc1"] == 0.5


def test_int_and_float_choices_compare_by_value():
    space = workspace("builtin:digits-net").space
    p = Policy(space.model, space.fingerprint, {"wbits:fc1": 8.0, "rank:fc1": 0.5}, space.options)
    assert p.validate(space).resolved(space)["wbits:fc1"] == 8


@pytest.mark.parametrize("text, fragment", [
    ('{"format": "autocompress.policy/1", "decisions": {', "not valid JSON (line 1"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"decisions": {}}', "is not 'autocompress.policy/1'"),
    ('{"format": "autocompress.policy/1", "decisions": [1]}', "'decisions' must be an object"),
    ('{"format": "autocompress.policy/1", "decisions": {}, "options": 3}', "'options' must be an object"),
])
def test_corrupt_policy_file(tmp_path, text, fragment):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PolicyError) as exc:
        Policy.load(path)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg and str(path) in msg


def test_missing_and_binary_policy_files(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "absent.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PolicyError) as exc:
        Policy.load(tmp_path / "bin.json")
    assert "\n" not in str(exc.value)
