"""The report's pictures (stt_jax.report_plots) from a small synthetic run folder: what each
one draws equals the workdir's rows, and a missing input leaves a note, not a failure."""

import json
import math
import os

import pytest
from matplotlib import collections

from stt_jax import report_plots
from stt_jax.stages import report

STEPS = (10, 20, 30)


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def _eval_row(variant, step, lang, value, task="mgsm", metric="accuracy"):
  return {"variant": variant, "step": step, "task": task, "lang": lang, "metric": metric,
          "value": value, "ci_low": value - 0.04, "ci_high": value + 0.05, "n": 250,
          "model": "tiny", "params": 1e6, "truncated": 0}


def _train_rows(n, start):
  return [{"step": 2 * k, "epoch": 0, "loss": start / k + 0.1 * (k % 2), "loss_mean": start / k,
           "lr": 1e-4} for k in range(1, n + 1)]


def _stats(lang, kept, dropped):
  return {"task": "mgsm", "lang": lang, "model": "tiny", "items": kept + sum(dropped.values()),
          "kept": kept, "dropped": dropped, "segments": {"total": 9}}


@pytest.fixture(name="workdir")
def _workdir(tmp_path):
  """Eval at three steps per trained variant (plus base at 0) in two languages, train logs of
  two variants, translation stats of two languages."""
  rows = [_eval_row("base", 0, lang, 0.1) for lang in ("en", "th")]
  rows += [_eval_row(v, s, lang, 0.2 + 0.01 * s + (0.1 if v == "self_translate" else 0))
           for v in ("zero_shot", "self_translate") for s in STEPS for lang in ("en", "th")]
  rows += [_eval_row("zero_shot", 30, "th", 0.5, metric="exact")]  # Not the primary metric.
  _write_jsonl(str(tmp_path / "eval" / "metrics.jsonl"), rows)
  for variant, start in (("zero_shot", 4.0), ("self_translate", 3.0)):
    _write_jsonl(str(tmp_path / "runs" / variant / "train" / "metrics.jsonl"),
                 _train_rows(12, start))
  (tmp_path / "translations").mkdir()
  for lang, kept, dropped in (("th", 90, {"script": 6, "copy": 4}),
                              ("sw", 70, {"length_ratio": 20, "empty": 1, "unaligned": 9})):
    (tmp_path / "translations" / f"mgsm_{lang}.stats.json").write_text(
        json.dumps(_stats(lang, kept, dropped)))
  (tmp_path / "config.json").write_text(json.dumps({"model": {"name": "tiny", "path": "/m"}}))
  return tmp_path


@pytest.fixture(name="drawn")
def _drawn(monkeypatch):
  """The figures report_plots saves, by file name, left open to read their axes."""
  figs = {}
  save = report_plots._save  # pylint: disable=protected-access

  def keep(fig, path):
    figs[os.path.basename(path)] = fig.axes
    save(fig, path)

  monkeypatch.setattr(report_plots, "_save", keep)
  return figs


def _lines(ax):
  """label -> (xs, ys) of the labelled lines of one panel."""
  return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines
          if not ln.get_label().startswith("_")}


def _color_of(ax, label):
  return next(ln.get_color() for ln in ax.lines if ln.get_label() == label)


def test_every_picture_plots_the_workdirs_rows(workdir, drawn):
  md = report.write_report([str(workdir)])
  for name in ("report", "train_loss", "eval_curves", "translation_filters"):
    assert (workdir / f"{name}.png").stat().st_size > 5000, name
    assert f"]({name}.png)\n*" in md, name  # Embedded with a caption line.
  assert "Figures" in (workdir / "report.md").read_text()

  # Training loss: one panel named by config.json's model; the solid line of each variant is
  # its loss_mean (12 rows: no extra smoothing), the faint one the logged step's loss.
  (ax,) = drawn["train_loss.png"]
  assert ax.get_title() == "tiny"
  lines = _lines(ax)
  assert list(lines) == ["zero_shot", "self_translate"]
  for variant, start in (("zero_shot", 4.0), ("self_translate", 3.0)):
    rows = _train_rows(12, start)
    assert lines[variant] == ([r["step"] for r in rows], pytest.approx([r["loss_mean"]
                                                                         for r in rows]))
  raw = [ln for ln in ax.lines if ln.get_label().startswith("_")]
  assert [list(ln.get_ydata()) for ln in raw][0] == [r["loss"] for r in _train_rows(12, 4.0)]
  assert raw[0].get_alpha() < 0.5 and raw[0].get_color() == _color_of(ax, "zero_shot")

  # Eval curves: one panel per language (target first), each variant's accuracy per step; the
  # other metric is not drawn; base (one step) is a point with its interval.
  axes = drawn["eval_curves.png"]
  assert [a.get_title() for a in axes] == ["mgsm th", "mgsm en"]
  th = _lines(axes[0])
  assert th["self_translate"] == (list(STEPS), pytest.approx([0.4, 0.5, 0.6]))
  assert th["zero_shot"] == (list(STEPS), pytest.approx([0.3, 0.4, 0.5]))
  legend = [t.get_text() for t in axes[0].figure.legends[0].get_texts()]
  assert legend == ["base (one step)", "zero_shot", "self_translate"]
  bands = [c for c in axes[0].collections if isinstance(c, collections.PolyCollection)]
  band = bands[0].get_paths()[0].vertices  # zero_shot's: base has no band.
  assert min(band[:, 1]) == pytest.approx(0.26) and max(band[:, 1]) == pytest.approx(0.55)
  colors = {v: report._color(v) for v in th}  # pylint: disable=protected-access
  assert {v: _color_of(axes[0], v) for v in th} == colors  # As in the other pictures.

  # Translation filters: stacked bars per language, kept at the bottom, reasons on top; the
  # heights of each bar add up to its items.
  (ax,) = drawn["translation_filters.png"]
  labels = [t.get_text() for t in ax.get_xticklabels()]
  assert labels == ["sw", "th"]
  heights = {c.get_label().split(" (")[0]: [p.get_height() for p in c.patches]
             for c in ax.containers}
  assert heights["kept"] == [70, 90]
  assert heights["dropped: script"] == [0, 6] and heights["dropped: unaligned"] == [9, 0]
  assert [sum(h) for h in zip(*heights.values())] == [100, 100]
  assert list(heights)[1:] == ["dropped: empty", "dropped: copy", "dropped: script",
                               "dropped: length_ratio", "dropped: unaligned"]


def test_missing_inputs_leave_a_note_and_no_picture(tmp_path):
  """One scored step per variant, no train log rows, no translation stats: only the results
  bars are drawn; a run folder with nothing at all still gets its report."""
  _write_jsonl(str(tmp_path / "eval" / "metrics.jsonl"),
               [_eval_row("base", 0, "th", 0.1), _eval_row("zero_shot", 4, "th", 0.3)])
  _write_jsonl(str(tmp_path / "runs" / "zero_shot" / "train" / "metrics.jsonl"), [])
  md = report.write_report([str(tmp_path)])
  assert sorted(p.name for p in tmp_path.glob("*.png")) == ["report.png"]
  assert "Training loss: no train log rows yet" in md
  assert "each variant has one scored checkpoint" in md
  assert "Translation filters: no translation stats" in md

  empty = tmp_path / "empty"
  report.write_report([str(empty)])
  text = (empty / "report.md").read_text()
  assert "No metrics yet." in text and "Eval curves: no eval metrics yet" in text
  assert not list(empty.glob("*.png"))


def test_loss_is_smoothed_over_long_runs_and_skips_non_finite_rows():
  rows = _train_rows(100, 5.0)
  rows[7]["loss"] = math.nan
  data = report_plots.loss_data({"m": {"v": rows}})["m"]["v"]
  assert len(data["step"]) == 99 and rows[7]["step"] not in data["step"]
  means = [r["loss_mean"] for r in rows if r is not rows[7]]
  assert data["smooth"] == report_plots.smooth(means, 5) != means
  assert report_plots.loss_data({"m": {"v": [{"step": 1, "loss": math.inf}]}}) == {}


def test_smooth_is_bias_corrected():
  assert report_plots.smooth([3.0, 1.0, 2.0], 1) == [3.0, 1.0, 2.0]
  out = report_plots.smooth([2.0] * 5 + [0.0], 4)
  assert out[:5] == pytest.approx([2.0] * 5) and 0 < out[5] < 2.0


def test_filter_labels_name_task_and_model_when_several():
  stats = [_stats("th", 5, {"copy": 1}), {**_stats("th", 3, {}), "task": "xnli"},
           {"task": "mgsm", "lang": "de"}]  # No counts (unfinished): left out.
  assert report_plots.filter_data(stats) == {"mgsm th": {"kept": 5, "copy": 1},
                                             "xnli th": {"kept": 3}}
  stats[1]["model"] = "big"
  assert list(report_plots.filter_data(stats)) == ["big\nxnli th", "tiny\nmgsm th"]
