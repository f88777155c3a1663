"""Pruned widths rounded to the multiple that runs fast: chosen by calibration, used by the search."""

from __future__ import annotations

import random

import onnx
import pytest
import torch

from autocompress.errors import UserInputError
from autocompress.hwmodels import predict
from autocompress.hwmodels.calibrate import choose_round_to, probe_widths
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import TARGETS
from autocompress.search.core import SearchConfig
from autocompress.search.setup import space_options

# ONNX Runtime, one AVX2 core, min over 150 runs: the conv pair at even widths. Multiples of 4 but not
# of 8 run as fast as the multiple of 8 above them (padded), other widths slower still (plain kernels).
AVX2 = {40: .964, 42: 1.199, 44: .927, 46: 1.049, 48: .927, 50: 1.16, 52: 1.08, 54: 1.214, 56: 1.07,
        58: 1.364, 60: 1.216, 62: 1.423, 64: 1.267}


def staircase(block: int) -> dict[int, float]:
    """Latency proportional to the width padded up to ``block``."""
    return {w: 0.02 * (-(-w // block) * block) for w in range(40, 65)}


@pytest.mark.parametrize("block", [2, 4, 8, 16])
def test_a_padded_staircase_gives_its_block(block):
    assert choose_round_to(staircase(block)) == block


def test_every_width_its_own_speed_gives_1_and_the_avx2_timings_give_8():
    assert choose_round_to({w: 0.02 * w for w in range(40, 65)}) == 1
    assert choose_round_to(AVX2) == 8


def test_convs_pad_to_the_channel_block():
    from autocompress.space.costs import CostTable
    from autocompress.space.graph import trace

    def conv_ms(width: int, bits: int, target: Target) -> float:
        net = torch.nn.Sequential(torch.nn.Conv2d(64, width, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(width, 64, 3, padding=1))
        table = CostTable.from_graph(trace(net.eval(), (1, 64, 28, 28)))
        for row in table:
            if row.op == "conv":
                row.wbits = row.abits = bits
        return predict(table, target).latency_ms

    for bits in (32, 8):  # 44 channels cost as 48 with a block of 8, 40 less; with a block of 16, 40 as 48
        block8, block16 = (TARGETS.get("local").with_(channel_block=b) for b in (8, 16))
        assert conv_ms(44, bits, block8) == pytest.approx(conv_ms(48, bits, block8), rel=0.02)
        assert conv_ms(40, bits, block8) < 0.97 * conv_ms(48, bits, block8)
        assert conv_ms(40, bits, block16) == pytest.approx(conv_ms(48, bits, block16), rel=0.02)


@pytest.mark.parametrize("block", [4, 8, 16])
def test_the_block_shows_through_noise(block):
    rng = random.Random(block)
    noisy = {w: t * rng.uniform(0.97, 1.03) for w, t in staircase(block).items()}
    assert choose_round_to(noisy) == block


def test_the_probe_times_one_valid_file_per_width_and_chooses_from_them(tmp_path, monkeypatch):
    import autocompress.hwmodels.measure as measure

    seen = []

    def fake(paths, threads=1, rounds=3, **kw):
        seen.extend(paths)
        widths = [int(p.stem.split("-")[1]) for p in paths]
        return [staircase(8)[w] for w in widths]

    monkeypatch.setattr(measure, "measure_files", fake)
    probe = probe_widths(tmp_path)
    assert probe.round_to == 8 and probe.widths == tuple(range(40, 65)) and len(seen) == 25
    model = onnx.load(seen[3])  # width 43
    onnx.checker.check_model(model)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert shapes["w1"] == [43, 64, 3, 3] and shapes["w2"] == [64, 43, 3, 3]
    assert probe.to_json()["round_to"] == 8


def test_the_search_rounds_to_the_targets_multiple_unless_told(tmp_path, monkeypatch):
    from autocompress.hwmodels.targets import target_path

    t = TARGETS.get("mobile").with_(name="roundy", prune_round_to=8)
    path = t.save(target_path("roundy"))
    try:
        assert Target.load(path).prune_round_to == 8
        assert space_options(SearchConfig(target="roundy")) == {"prune_round_to": 8}
        assert space_options(SearchConfig(target="roundy", prune_round_to=1)) == {"prune_round_to": 1}
        assert space_options(SearchConfig(target="roundy"), {"prune_round_to": 4}) == {"prune_round_to": 4}
    finally:
        path.unlink()


@pytest.mark.parametrize("bad", [0, -4, True, 2.5])
def test_a_bad_multiple_is_refused(bad):
    with pytest.raises(UserInputError, match="prune_round_to"):
        TARGETS.get("mobile").with_(prune_round_to=bad)


def test_the_cli_refuses_a_bad_prune_round_to(tmp_path):
    from conftest import assert_one_line_error, run_cli

    res = run_cli("search", "--target", "mobile", "--budget", "5ms", "--prune-round-to", "0", "--out",
                  str(tmp_path / "o"))
    assert_one_line_error(res, "--prune-round-to")
    assert not (tmp_path / "o").exists()
