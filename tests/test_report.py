"""`dapo report`: synthetic TensorBoard event files in, valid PNG charts out (one per panel group with data, an
overview, the unclaimed tags), several runs overlaid, a clear error when there is nothing to plot."""

import matplotlib.image as mpimg
import pytest
from torch.utils.tensorboard import SummaryWriter

from pipeline.tools.report import GROUPS, _ema, load_runs, render, report_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TAGS = ["reward/mean", "reward/acc", "response/len_mean", "train/entropy", "train/clipfrac_upper",
        "filter/drop_all_wrong", "staleness/mean", "perf/gen_tokens_per_s", "time/weight_sync(s)", "custom/thing"]  # fmt: skip


def _write_run(path, steps=6, scale=1.0):
    w = SummaryWriter(str(path))
    for step in range(steps):
        for i, tag in enumerate(TAGS):
            w.add_scalar(tag, scale * (0.1 * step + i), step)
    w.close()


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_scalars_are_read_back(tmp_path):
    _write_run(tmp_path / "run")
    runs = load_runs(tmp_path / "run")
    (scalars,) = runs.values()
    steps, values = scalars["reward/acc"]  # tag index 1: value 0.1 * step + 1
    assert steps == [0, 1, 2, 3, 4, 5]
    assert values == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    assert set(scalars) == set(TAGS)


def test_report_writes_valid_pngs(tmp_path, capsys):
    _write_run(tmp_path / "run")
    out = tmp_path / "png"
    assert report_main([str(tmp_path / "run"), "--out", str(out), "--dpi", "40", "--smooth", "0.5"]) == 0
    written = sorted(p.name for p in out.iterdir())
    # every group has a tag here; custom/thing is claimed by no group and lands in other.png
    assert written == sorted(["overview.png", "other.png", *(f"{g}.png" for g in GROUPS)])
    for p in out.iterdir():
        _assert_png(p)
    assert str(out / "overview.png") in capsys.readouterr().out


def test_groups_without_data_are_skipped_and_runs_overlaid(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        w = SummaryWriter(str(tmp_path / name))
        for step in range(4):
            w.add_scalar("reward/acc", scale * step, step)
        w.close()
    runs = load_runs(tmp_path)
    assert sorted(runs) == ["a", "b"]
    assert runs["b"]["reward/acc"][1] == [0.0, 2.0, 4.0, 6.0]
    paths = render(runs, tmp_path / "out", dpi=40)
    assert sorted(p.name for p in paths) == ["overview.png", "rewards.png"]
    for p in paths:
        _assert_png(p)


def test_nothing_to_plot(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no TensorBoard scalars" in capsys.readouterr().err
    assert report_main([str(tmp_path / "missing")]) == 2
    assert report_main([str(tmp_path), "--smooth", "1.5"]) == 2


def test_ema():
    assert _ema([1.0, 3.0, 3.0], 0.5) == [1.0, 2.0, 2.5]
