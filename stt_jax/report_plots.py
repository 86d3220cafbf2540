"""The report's pictures besides the results bars: training loss per variant over steps, the
eval metric of every scored checkpoint with its 95% interval, and what the translation filters
kept and dropped per language. A loss that diverges, a curve still rising at the last
checkpoint or a language that lost half its data to one filter is seen at a glance here and
easily missed in a table.

The report stage reads the run folders and passes plain data. Each `*_data` function returns
exactly what its picture plots (the tests assert on it); `write_figures` draws the pictures
whose inputs exist and returns markdown that embeds each one with a caption, or says why a
picture was left out, so missing inputs never fail the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence

from stt_jax.translate_filters import REASONS

# Drop reasons of translate_assemble after the filters' own: no answer span found in the
# translation (extractive tasks).
DROP_REASONS = (*REASONS, "unaligned")
KEPT_COLOR = "#59a14f"
# Kept by the filters but dropped by the round-trip filter (self_translate_rt only).
ROUNDTRIP = "roundtrip"
ROUNDTRIP_COLOR = "#a0cbe8"
REASON_COLORS = {"empty": "#bab0ac", "truncated": "#f28e2b", "repetition": "#b07aa1",
                 "copy": "#9c755f", "script": "#e15759", "length_ratio": "#4e79a7",
                 "numbers": "#ff9da7", "unaligned": "#edc948"}


@dataclasses.dataclass(frozen=True)
class Style:
  """What the report decides for all its pictures: the metric shown per task, the variant
  order, and one colour per variant (the same in every picture)."""
  primary: Mapping[str, str]
  order: Sequence[str]
  color: Callable[[str], str]

  def variants(self, seen) -> list[str]:
    seen = set(seen)
    return [v for v in self.order if v in seen] + sorted(seen - set(self.order))


def _pyplot():
  """pyplot on the Agg backend (no display on a training host), imported when drawing."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _langs(seen) -> list[str]:
  """Target languages first, English (the source) last, as in the tables."""
  seen = set(seen)
  return sorted(seen - {"en"}) + (["en"] if "en" in seen else [])


# ------------------------------------------------------------------------------ training loss


def smooth(values: Sequence[float], span: int) -> list[float]:
  """Exponential moving average over about `span` points, bias-corrected (as TensorBoard's)
  so the first points are not pulled towards zero; span 1 returns the values."""
  a, avg, weight, out = 2 / (span + 1), 0.0, 0.0, []
  for v in values:
    avg, weight = (1 - a) * avg + a * v, (1 - a) * weight + a
    out.append(avg / weight)
  return out


def loss_data(runs: Mapping[str, Mapping[str, Sequence[dict]]]) -> dict[str, dict[str, dict]]:
  """panel (model) -> variant -> {step, raw, smooth} from train log rows. Raw is the loss of
  the logged step; smooth is the mean since the previous row (`loss_mean`), averaged further
  over a twentieth of the run when it has many rows. Non-finite losses are left out."""
  out = {}
  for panel, variants in runs.items():
    curves = {}
    for variant, rows in variants.items():
      by_step = {r["step"]: r for r in rows if math.isfinite(r.get("loss", math.nan))}
      steps = sorted(by_step)
      if not steps:
        continue
      mean = [by_step[s].get("loss_mean", by_step[s]["loss"]) for s in steps]
      curves[variant] = {"step": steps, "raw": [by_step[s]["loss"] for s in steps],
                         "smooth": smooth(mean, max(1, round(len(steps) / 20)))}
    if curves:
      out[panel] = curves
  return out


def loss_figure(data, style: Style, path: str) -> None:
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(data), figsize=(6 * len(data), 4), squeeze=False)
  smooth = [y for curves in data.values() for c in curves.values() for y in c["smooth"]]
  log = min(smooth) > 0 and max(smooth) / min(smooth) > 10  # The first steps would flatten
  for ax, (panel, curves) in zip(axes[0], data.items()):  # the rest on a linear axis.
    for v in style.variants(curves):
      c, color = curves[v], style.color(v)
      marker = "o" if len(c["step"]) <= 20 else None
      ax.plot(c["step"], c["raw"], color=color, alpha=0.3, linewidth=1, marker=marker,
              markersize=3)
      ax.plot(c["step"], c["smooth"], color=color, linewidth=2, marker=marker, markersize=4,
              label=v)
    if log:
      ax.set_yscale("log")
      ax.yaxis.set_major_locator(plt.LogLocator(subs=(1, 2, 5)))  # 0.2, 0.5, 1, 2, 5, ...
      ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda y, _: f"{y:g}"))
      ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_title(panel)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per target token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="solid: smoothed, faint: raw", title_fontsize=7)
  _save(fig, path)


# ------------------------------------------------------------------------------ eval curves


def curve_data(rows: Sequence[dict], style: Style) -> dict[tuple, dict[str, dict]]:
  """(model, task, metric) -> lang -> variant -> {step, value, ci_low, ci_high}, sorted by
  step, for each task's primary metric (a rescored step keeps its last row)."""
  metrics: dict[str, str] = {}
  for r in rows:  # A task the report does not know shows its first metric.
    metrics.setdefault(r["task"], style.primary.get(r["task"], r["metric"]))
  points: dict[tuple, dict] = {}
  for r in rows:
    metric = metrics[r["task"]]
    if r["metric"] == metric:
      key = (r.get("model", ""), r["task"], metric)
      points.setdefault(key, {}).setdefault(r["lang"], {}).setdefault(
          r["variant"], {})[r["step"]] = r
  out = {}
  for key in sorted(points):
    out[key] = {}
    for lang in _langs(points[key]):
      out[key][lang] = {}
      for v in style.variants(points[key][lang]):
        by_step = points[key][lang][v]
        steps = sorted(by_step)
        out[key][lang][v] = {"step": steps, **{f: [by_step[s][f] for s in steps]
                                               for f in ("value", "ci_low", "ci_high")}}
  return out


def has_curve(data) -> bool:
  """Some variant was scored at two steps or more (else there is no curve to draw)."""
  return any(len(c["step"]) > 1 for langs in data.values() for variants in langs.values()
             for c in variants.values())


def curve_figure(data, style: Style, path: str, cols: int = 6) -> None:
  """One row of panels (wrapped at `cols`) per (model, task), one panel per language; the
  panels of a row share their y range so languages compare at a glance."""
  plt = _pyplot()
  models = {m for m, _, _ in data}
  layout = []  # (row, col, key, lang)
  nrows = 0
  for key, langs in data.items():
    layout += [(nrows + i // cols, i % cols, key, lang) for i, lang in enumerate(langs)]
    nrows += -(-len(langs) // cols)
  ncols = max(c for _, c, _, _ in layout) + 1
  fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
  for r, c in {(r, c) for r in range(nrows) for c in range(ncols)} - {x[:2] for x in layout}:
    axes[r][c].remove()  # Past the last language of a row.
  # Variants that score alike would hide each other: earlier ones are drawn wider, with
  # larger markers of their own shape, so every line shows around the ones on top of it.
  rank = {v: i for i, v in enumerate(style.variants(
      v for langs in data.values() for variants in langs.values() for v in variants))}
  legend = {}
  for r, c, key, lang in layout:
    ax, (model, task, metric) = axes[r][c], key
    for v, d in data[key][lang].items():
      color, wide = style.color(v), len(rank) - 1 - rank[v]
      mark = {"marker": "os^Dv<>P"[rank[v] % 8], "markersize": 4 + 1.5 * wide}
      if len(d["step"]) > 1:
        ax.fill_between(d["step"], d["ci_low"], d["ci_high"], color=color, alpha=0.15,
                        linewidth=0)
        legend[v] = ax.plot(d["step"], d["value"], color=color, linewidth=1.2 + 0.9 * wide,
                            label=v, **mark)[0]
      else:
        y, lo, hi = d["value"][0], d["ci_low"][0], d["ci_high"][0]
        label = f"{v} (one step)"
        legend[label] = ax.errorbar(d["step"], d["value"], yerr=[[max(y - lo, 0)],
                                                                 [max(hi - y, 0)]],
                                    color=color, capsize=3, linestyle="none", label=label,
                                    **mark)
    steps = sorted({s for d in data[key][lang].values() for s in d["step"]})
    if len(steps) <= 8:
      ax.set_xticks(steps)  # Tick the scored checkpoints themselves.
    else:
      ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    lows = [y for d in data[key].values() for c in d.values() for y in c["ci_low"]]
    highs = [y for d in data[key].values() for c in d.values() for y in c["ci_high"]]
    pad = 0.05 * (max(highs) - min(lows)) or 0.01
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    ax.set_title(f"{task} {lang}{f' — {model}' if len(models) > 1 else ''}", fontsize=10)
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.legend(legend.values(), legend.keys(), loc="lower center", bbox_to_anchor=(0.5, 1.0),
             ncol=len(legend), fontsize=9, title="band: 95% interval", title_fontsize=8)
  _save(fig, path)


# ------------------------------------------------------------------------------ translation


def filter_data(stats: Sequence[dict]) -> dict[str, dict[str, int]]:
  """Bar label -> {'kept': n, 'roundtrip': n, reason: n, ...} (reasons in filter order, zeros
  left out) from the translate stage's `<task>_<lang>.stats.json`; the counts sum to the
  English items. 'roundtrip': rows the filters kept and the round-trip filter dropped (only
  self_translate_rt loses them); 'kept' then counts the rows that passed both."""
  stats = [s for s in stats if isinstance(s, dict) and "kept" in s and "items" in s]
  tasks, models = {s.get("task") for s in stats}, {s.get("model") for s in stats}
  out = {}
  for s in sorted(stats, key=lambda s: (str(s.get("model")), str(s.get("task")),
                                        s.get("lang") == "en", str(s.get("lang")))):
    label = str(s.get("lang"))
    if len(tasks) > 1:
      label = f"{s.get('task')} {label}"
    if len(models) > 1:
      label = f"{s.get('model')}\n{label}"
    dropped = s.get("dropped") or {}
    order = [r for r in DROP_REASONS if r in dropped] + sorted(set(dropped) - set(DROP_REASONS))
    back = (s.get("roundtrip") or {}).get("dropped", 0)
    out[label] = {"kept": s["kept"] - back, **({ROUNDTRIP: back} if back else {}),
                  **{r: dropped[r] for r in order if dropped[r]}}
  return out


def roundtrip_table(stats: Sequence[dict]) -> str:
  """Markdown: the round-trip filter's counts and chrF quantiles per task and language ('' when
  no stats file has them)."""
  rows = [s for s in stats if isinstance(s, dict) and "checked" in (s.get("roundtrip") or {})]
  if not rows:
    return ""
  md = ["\n### Round-trip filter (self_translate_rt)\n",
        "| task | lang | rule | checked | kept | dropped | chrF p10 | p50 | p90 |",
        "|---|---|---|---|---|---|---|---|---|"]
  for s in sorted(rows, key=lambda s: (str(s.get("task")), str(s.get("lang")))):
    r = s["roundtrip"]
    rule = ", ".join(f"{k} {v:g}" for k, v in r["rule"].items())
    q = r["chrf"].get("row_min", {})
    cells = [f"{q[k]:.1f}" if k in q else "—" for k in ("p10", "p50", "p90")]
    md.append(f"| {s.get('task')} | {s.get('lang')} | {rule} | {r['checked']} | {r['kept']} "
              f"| {r['dropped']} | " + " | ".join(cells) + " |")
  md.append("\nChecked: rows the filters kept; each is translated back to English by the same "
            "model, and its score is the lowest chrF (0-100) of its fields "
            f"({', '.join(rows[0]['roundtrip']['fields'])}, ...) against the English source.\n")
  return "\n".join(md)


def filter_figure(data, path: str) -> None:
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(data) + 3), 4))
  labels = list(data)
  parts = ["kept"] + [r for r in (ROUNDTRIP, *DROP_REASONS) if any(r in d for d in data.values())]
  parts += sorted({r for d in data.values() for r in d} - set(parts))
  bottom = [0] * len(labels)
  for part in parts:
    heights = [data[x].get(part, 0) for x in labels]
    total = sum(heights)
    name = {"kept": "kept", ROUNDTRIP: "kept; dropped by round-trip (rt variant only)"}.get(
        part, f"dropped: {part}")
    color = {"kept": KEPT_COLOR, ROUNDTRIP: ROUNDTRIP_COLOR}.get(
        part, REASON_COLORS.get(part, "#79706e"))
    ax.bar(labels, heights, 0.6, bottom=bottom, label=f"{name} ({total})", color=color)
    bottom = [b + h for b, h in zip(bottom, heights)]
  for i, x in enumerate(labels):
    kept, total = data[x]["kept"] + data[x].get(ROUNDTRIP, 0), bottom[i]
    ax.text(i, total, f"{kept}/{total} kept\n({100 * kept / max(total, 1):.0f}%)",
            ha="center", va="bottom", fontsize=8)
  ax.set_xlim(-0.8, len(labels) - 0.2)
  ax.set_ylim(0, max(bottom) * 1.15 if max(bottom) else 1)
  ax.set_ylabel("English training items")
  ax.set_title("translated items kept / dropped by filter")
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  _save(fig, path)


# ------------------------------------------------------------------------------ all together


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120, bbox_inches="tight")
  _pyplot().close(fig)


CAPTIONS = {
    "results": "Primary metric of each variant's last checkpoint per language (bars: 95% "
               "interval).",
    "train_loss": "Training loss per variant over optimizer steps (faint: the logged step's "
                  "loss; solid: mean since the previous row, smoothed).",
    "eval_curves": "Primary metric at every scored checkpoint, one panel per language "
                   "(band: 95% interval).",
    "translation_filters": "English training items whose translation was kept or dropped, "
                           "by the first filter it failed (light blue: kept by the filters, "
                           "dropped by the round-trip filter).",
}


def _embed(path: str, name: str) -> str:
  """The picture (beside report.md) and its one-line caption."""
  return f"![{name.replace('_', ' ')}]({os.path.basename(path)})\n*{CAPTIONS[name]}*\n"


def write_figures(path: Callable[[str], str], style: Style, rows: Sequence[dict],
                  runs: Mapping[str, Mapping[str, Sequence[dict]]], stats: Sequence[dict],
                  results_png: str | None = None) -> str:
  """Draws train_loss, eval_curves and translation_filters into path(name) when their
  inputs exist; markdown with each picture (and the results bars in `results_png`) and its
  caption, or a note saying why it is missing."""
  md = ["\n## Figures\n"]
  if results_png:
    md.append(_embed(results_png, "results"))
  loss = loss_data(runs)
  if loss:
    loss_figure(loss, style, path("train_loss"))
    md.append(_embed(path("train_loss"), "train_loss"))
  else:
    md.append("*Training loss: no train log rows yet (runs/<variant>/train/metrics.jsonl).*\n")
  curves = curve_data(rows, style)
  if has_curve(curves):
    curve_figure(curves, style, path("eval_curves"))
    md.append(_embed(path("eval_curves"), "eval_curves"))
  elif curves:
    md.append("*Eval curves: each variant has one scored checkpoint; a curve needs "
              "checkpoint.every below train.steps.*\n")
  else:
    md.append("*Eval curves: no eval metrics yet (eval/metrics.jsonl).*\n")
  filters = filter_data(stats)
  if filters:
    filter_figure(filters, path("translation_filters"))
    md.append(_embed(path("translation_filters"), "translation_filters"))
    md.append(roundtrip_table(stats))
  else:
    md.append("*Translation filters: no translation stats "
              "(translations/<task>_<lang>.stats.json).*\n")
  return "\n".join(md)
