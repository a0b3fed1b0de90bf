"""`dapo ablate`: the cumulative variants, the table arithmetic and argument errors (the runs are e2e-tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.tools.ablation import VARIANTS, ablate_main, table, variant_overrides

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml")


def test_variants_switch_components_on_one_at_a_time():
    cfgs = [load_config(TINY, variant_overrides(i)).algorithm for i in range(len(VARIANTS))]
    got = [(a.eps_high, a.overlong.soft_punish, a.loss_agg, a.dynamic_sampling) for a in cfgs]
    assert got == [
        (0.2, False, "seq-mean-token-mean", False),  # GRPO: symmetric clip (eps_low is 0.2)
        (0.28, False, "seq-mean-token-mean", False),
        (0.28, True, "seq-mean-token-mean", False),
        (0.28, True, "token-mean", False),
        (0.28, True, "token-mean", True),  # = the DAPO defaults
    ]
    assert all(a.eps_low == 0.2 for a in cfgs)


def test_table_mean_spread_and_gain():
    recs = [
        {"variant": "GRPO baseline", "seed": 0, "acc_before": 0.4, "acc_after": 0.5},
        {"variant": "GRPO baseline", "seed": 1, "acc_before": 0.4, "acc_after": 0.7},
        {"variant": "+ Dynamic sampling (DAPO)", "seed": 0, "acc_before": 0.3, "acc_after": 0.9},
    ]
    lines = table(recs).splitlines()
    # mean 0.6, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414, gain mean(0.1, 0.3) = 0.2
    assert lines[2] == "| GRPO baseline | 0.600 ± 0.141 | +0.200 | 2 |"
    assert lines[3] == "| + Dynamic sampling (DAPO) | 0.900 ± 0.000 | +0.600 | 1 |"
    assert len(lines) == 4  # variants without runs are left out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([TINY, "--seeds", "a,b"], "--seeds must be comma-separated integers; got 'a,b'"),
        ([TINY, "--steps", "0"], "needs at least one seed and --steps >= 1"),
        ([TINY, "trainer.nope=1"], "config error: trainer.nope"),
        ([TINY, "data.eval_path=''"], "data.eval_path is empty"),
    ],
)
def test_bad_arguments_are_named(argv, message, capsys):
    assert ablate_main(argv) == 2
    assert message in capsys.readouterr().out
