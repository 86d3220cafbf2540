"""The report stage: results table and plots from `eval/metrics.jsonl`: variants × languages,
deltas over zero-shot cross-lingual transfer, 95% intervals, and accuracy vs model size; and
per task each variant's paired difference to zero-shot transfer on the same test items
(`eval/predictions/`: paired bootstrap interval, McNemar's exact test).

    python -m stt_jax.stages.report --workdir=/path/to/workdir [--workdir=another ...]

Each metric row is {variant, step, task, lang, metric, value, ci_low, ci_high, n, model,
params, truncated}. The table takes each (model, variant)'s latest step (the end of training).
A cell marked †k had k generations cut by eval.max_new_tokens (their answers may be missing);
what train.seq_len cut from the training data (runs/<variant>/train/metrics.jsonl) is listed
under the tables, so a number lowered by a budget is not read as a result. Each stage's wall
time and resident memory peak (workdir/resources.jsonl, written by `measured` around every
stage) close the report.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import ml_collections

from stt_jax import appendlog, hosts, memory, report_plots, scoring
from stt_jax.run_config import model_label
from stt_jax.tasks import TASKS
from stt_jax.workdir import Workdir, read_json

PRIMARY = {"mgsm": "accuracy", "xquad": "f1", "xnli": "accuracy"}
VARIANT_ORDER = ("base", "zero_shot", "self_translate", "self_translate_cs",
                 "self_translate_rt")
BASELINE = "zero_shot"


def read_metrics(paths: Iterable[str]) -> list[dict]:
  """Rows of every metrics.jsonl (torn or corrupt lines are skipped with a warning)."""
  rows = []
  for path in paths:
    if not os.path.isfile(path):
      continue
    with open(path, encoding="utf-8") as f:
      for k, line in enumerate(f, 1):
        if not line.strip() or not line.endswith("\n"):
          continue  # A torn last line of a writer still running (or killed).
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          logging.warning("%s:%d: unreadable metrics row skipped", path, k)
  return rows


def latest(rows: Sequence[dict]) -> dict[tuple, dict]:
  """(model, task, variant, lang, metric) -> the row with the highest step."""
  out: dict[tuple, dict] = {}
  for r in rows:
    key = (r.get("model", ""), r["task"], r["variant"], r["lang"], r["metric"])
    if key not in out or r["step"] >= out[key]["step"]:
      out[key] = r
  return out


def _variants(keys) -> list[str]:
  seen = {k[2] for k in keys}
  return [v for v in VARIANT_ORDER if v in seen] + sorted(seen - set(VARIANT_ORDER))


def _langs(keys) -> list[str]:
  seen = {k[3] for k in keys}
  return sorted(seen - {"en"}) + (["en"] if "en" in seen else [])


# Metrics in [0, 1], printed as percentages; the others (F1, exact match) are in [0, 100].
FRACTIONS = ("accuracy", "lm_eval_acc", "lm_eval_strict_match", "lm_eval_flexible_extract")
# What the second table of a task reproduces (stt_jax/tasks/compat.py, docs/tasks.md).
COMPAT_SOURCE = {
    "mgsm": "lm-evaluation-harness `mgsm_native_cot_<lang>`: exact_match after its "
            "strict-match and flexible-extract filters",
    "xnli": "lm-evaluation-harness `xnli_<lang>`: acc, its three sentences ranked by "
            "log-likelihood",
    "xquad": "MLQA's evaluation script (`mlqa_*`; ru by words and th by characters are our "
             "extension) and lm-evaluation-harness `xquad_<lang>` (`lm_eval_*`: SQuAD v1 "
             "rules, first gold answer only)",
}


def _fmt(value: float, metric: str) -> str:
  return f"{value * 100:.1f}" if metric in FRACTIONS else f"{value:.1f}"


def _cell(best: dict, key: tuple) -> tuple[str, float | None]:
  """'value [low, high] (+delta) †k' of one (model, task, variant, lang, metric), and the
  difference to zero-shot transfer (None for the baseline itself or without one)."""
  r, metric = best[key], key[4]
  cell = f"{_fmt(r['value'], metric)} [{_fmt(r['ci_low'], metric)}, " \
         f"{_fmt(r['ci_high'], metric)}]"
  base = best.get((key[0], key[1], BASELINE, key[3], metric))
  delta = None
  if base is not None and key[2] != BASELINE:
    delta = r["value"] - base["value"]
    cell += f" ({'+' if delta >= 0 else ''}{_fmt(delta, metric)})"
  if r.get("truncated"):
    cell += f" †{r['truncated']}"
  return cell, delta


# report.csv columns after the first twelve: the paired comparison with zero_shot (empty where
# there is none), so readers of the older columns keep working.
PAIRED_COLUMNS = ("paired_delta", "paired_ci_low", "paired_ci_high", "mcnemar_p", "paired_n",
                  "discordant_better", "discordant_worse")


def _csv_row(best: dict, key: tuple, delta, paired: dict | None = None) -> list:
  model, task, v, lang, metric = key
  r = best[key]
  p = (paired or {}).get(key)
  extra = ([p["delta"], p["ci_low"], p["ci_high"], p["p"], p["n"], p["better"], p["worse"]]
           if isinstance(p, dict) else [None] * len(PAIRED_COLUMNS))
  return [model, task, metric, v, lang, r["step"], r["value"], r["ci_low"], r["ci_high"],
          r.get("n"), delta, r.get("truncated"), *extra]


class Evals(NamedTuple):
  """One workdir's eval rows, the latest per (model, task, variant, lang, metric), and its
  per-item predictions, each file read once however many tables use them."""
  wd: Workdir
  rows: list[dict]
  best: dict[tuple, dict]
  cache: dict[str, list[dict] | None]

  def predictions(self, row: dict) -> tuple[str, list[dict] | None]:
    """(path, records; None when the file is missing) of `row`'s eval/predictions/ file."""
    path = self.wd.predictions(row["variant"], row["step"], row["task"], row["lang"])
    if path not in self.cache:
      self.cache[path] = appendlog.records(path) if os.path.isfile(path) else None
    return path, self.cache[path]


def latest_evals(workdirs: Sequence[str]) -> list[Evals]:
  """Each workdir's eval/metrics.jsonl reduced to its latest steps (the paired and label
  tables both read from this)."""
  evals = []
  for wd in map(Workdir, workdirs):
    rows = read_metrics([wd.eval_metrics])
    evals.append(Evals(wd, rows, latest(rows), {}))
  return evals


def paired_stats(evals: Sequence[Evals]) -> dict[tuple, dict | str]:
  """(model, task, variant, lang, metric) -> the paired comparison of each variant's latest
  step with zero_shot's on the same test items (eval/predictions/, matched by id):
  {delta, ci_low, ci_high, p (McNemar, None for graded metrics), n, better, worse}; a one-line
  error instead where the two files cover different items. Keys without both files are left
  out."""
  out: dict[tuple, dict | str] = {}
  for ev in evals:
    for key, row in ev.best.items():
      model, task, variant, lang, metric = key
      base = ev.best.get((model, task, BASELINE, lang, metric))
      if variant == BASELINE or base is None:
        continue
      (pa, a), (pb, b) = ev.predictions(row), ev.predictions(base)
      if a is None or b is None:
        continue
      try:
        a, b = scoring.paired_items(a, b, metric, names=(os.path.relpath(pa, ev.wd.root),
                                                         os.path.relpath(pb, ev.wd.root)))
      except ValueError as e:
        out[key] = f"report: {e}"
        logging.warning("%s", out[key])
        continue
      delta, lo, hi = scoring.paired_bootstrap(a, b)
      test = scoring.mcnemar(a, b)
      p, better, worse = test if test else (None, None, None)
      out[key] = {"delta": delta, "ci_low": lo, "ci_high": hi, "p": p, "n": len(a),
                  "better": better, "worse": worse}
  return out


def _paired_table(paired: dict, model: str, task: str, metric: str) -> list[str]:
  """Markdown: each variant (and the base model) minus zero_shot on the same test items."""
  keys = [k for k in paired if k[:2] == (model, task) and k[4] == metric]
  if not keys:
    return []
  md = [f"#### {task} — Δ vs {BASELINE} (paired){f' — {model}' if model else ''}\n",
        "| variant | lang | Δ | 95% interval | McNemar p | n | better / worse |",
        "|---|---|---|---|---|---|---|"]
  errors = []
  for v in _variants(keys):
    for lang in _langs(keys):
      p = paired.get((model, task, v, lang, metric))
      if isinstance(p, str):
        errors.append(f"- {v} {lang}: {p}")
      elif p is not None:
        sign = lambda x: ("+" if x >= 0 else "") + _fmt(x, metric)
        test = "—" if p["p"] is None else f"{p['p']:.3g}"
        counts = "—" if p["better"] is None else f"{p['better']} / {p['worse']}"
        md.append(f"| {v} | {lang} | {sign(p['delta'])} | [{sign(p['ci_low'])}, "
                  f"{sign(p['ci_high'])}] | {test} | {p['n']} | {counts} |")
  md.append(f"\nΔ: the variant's mean minus {BASELINE}'s over the same test items (matched by "
            "id in eval/predictions/), in the table's unit; interval: paired bootstrap (items "
            "resampled jointly, 2000 draws, seed 0); McNemar p: exact two-sided binomial test "
            "on the discordant items (better: only the variant right; worse: only "
            f"{BASELINE} right), — for a graded metric such as F1.\n")
  if errors:
    md += ["Not compared:\n", *errors, ""]
  return md


def label_shares(evals: Sequence[Evals]) -> dict[tuple, dict]:
  """(model, task, variant, lang) -> {'n': items, 'shares': {label: share, ..., 'other': share},
  'recall': {gold label: accuracy on its items} or None} of the latest step's predictions, for
  tasks with a closed label set (Task.labels). A model that learned only a label prior shows
  as one label near 100%, whatever its accuracy says; recall (where the prediction rows carry
  the gold `label`) shows which labels a model gets wrong."""
  out: dict[tuple, dict] = {}
  for ev in evals:
    for (model, task, variant, lang, _), row in ev.best.items():
      labels = TASKS[task].labels if task in TASKS else ()
      if not labels or (model, task, variant, lang) in out:
        continue
      _, preds = ev.predictions(row)
      if preds is None:
        continue
      counts = dict.fromkeys((*labels, "other"), 0)
      right, gold = dict.fromkeys(labels, 0), dict.fromkeys(labels, 0)
      for p in preds:
        answer = TASKS[task].extract_answer(str(p.get("prediction", "")), lang)
        counts[answer if answer in counts else "other"] += 1
        if p.get("label") in gold:
          gold[p["label"]] += 1
          right[p["label"]] += answer == p["label"]
      recall = ({k: right[k] / gold[k] for k in labels if gold[k]}
                if sum(gold.values()) == len(preds) else None)
      out[(model, task, variant, lang)] = {
          "n": len(preds), "shares": {k: c / max(len(preds), 1) for k, c in counts.items()},
          "recall": recall}
  return out


def _percent_table(title: str, shares: dict, keys: Sequence[tuple], field: str,
                   columns: Sequence[str], model: str) -> list[str]:
  """Markdown rows of `shares[key][field][column]` as percentages ('—' where absent), one
  row per (variant, lang) of `keys`."""
  md = [f"#### {title}{f' — {model}' if model else ''}\n",
        "| variant | lang | " + " | ".join(columns) + " | n |",
        "|---|---|" + "---|" * (len(columns) + 1)]
  for v in _variants(keys):
    for lang in _langs(keys):
      key = next((k for k in keys if k[2:] == (v, lang)), None)
      if key is not None:
        values = shares[key][field]
        md.append(f"| {v} | {lang} | " + " | ".join(
            f"{100 * values[c]:.1f}%" if c in values else "—" for c in columns)
                  + f" | {shares[key]['n']} |")
  return md


def _label_table(shares: dict, model: str, task: str) -> list[str]:
  """Markdown: the share of test items given each label, per variant and language."""
  keys = [k for k in shares if k[:2] == (model, task)]
  if not keys:
    return []
  labels = [k for k in shares[keys[0]]["shares"] if k != "other" or any(
      shares[key]["shares"]["other"] for key in keys)]
  md = _percent_table(f"{task} — predicted labels", shares, keys, "shares", labels, model)
  md.append("\nThe share of test items each model gave each label (its latest step, from "
            "eval/predictions/); a model that learned only the label prior of its training "
            "data puts most items in one column.\n")
  recall = [k for k in keys if shares[k].get("recall")]
  if recall:
    md += _percent_table(f"{task} — accuracy per gold label", shares, recall, "recall",
                         [k for k in labels if k != "other"], model)
    md.append("\nOf the test items whose gold label is the column's, the share the model got "
              "right (recall): models of equal accuracy can differ in which labels they "
              "confuse, e.g. where training left the boundary between two labels.\n")
  return md


def table(rows: Sequence[dict], paired: dict | None = None,
          labels: dict | None = None) -> tuple[str, list[list]]:
  """Markdown table(s), one per (model, task) for our metric and one for the metrics scored
  as published tables (when eval.lm_eval_compat wrote them), and the same content as CSV;
  with `paired` (paired_stats), each task's paired comparison with zero_shot too, and with
  `labels` (label_shares), how often each variant predicted each label."""
  best = latest(rows)
  md, csv_rows = [], [["model", "task", "metric", "variant", "lang", "step", "value",
                       "ci_low", "ci_high", "n", "delta_vs_zero_shot", "truncated",
                       *PAIRED_COLUMNS]]
  groups = sorted({(k[0], k[1]) for k in best})
  for model, task in groups:
    compat = _compat_metrics(best, model, task)
    metric = PRIMARY.get(task) or next(k[4] for k in best if k[:2] == (model, task))
    keys = [k for k in best if k[:2] == (model, task) and k[4] == metric]
    variants, langs = _variants(keys), _langs(keys)
    scale = "%" if metric in FRACTIONS else ""
    md.append(f"### {task} — {metric}{' (%)' if scale else ''}"
              f"{f' — {model}' if model else ''}\n")
    md.append("| variant | " + " | ".join(langs) + " |")
    md.append("|---|" + "---|" * len(langs))
    cut_any = False
    for v in variants:
      cells = _row_cells(best, [(model, task, v, lang, metric) for lang in langs], csv_rows,
                         paired)
      cut_any = cut_any or any(best.get((model, task, v, lang, metric), {}).get("truncated")
                               for lang in langs)
      md.append(f"| {v} | " + " | ".join(cells) + " |")
    ns = sorted({best[k].get("n") for k in keys if best[k].get("n") is not None})
    md.append(f"\nn = {', '.join(map(str, ns))} test items per language; brackets: bootstrap "
              f"95% interval; parentheses: difference to {BASELINE} (zero-shot transfer)."
              + ("\n†k: k generations hit eval.max_new_tokens before a stop (answers may be "
                 "cut off); raise eval.max_new_tokens." if cut_any else "") + "\n")
    md += _paired_table(paired or {}, model, task, metric)
    md += _label_table(labels or {}, model, task)
    if compat:
      md += _compat_table(best, model, task, compat, csv_rows, paired)
  return "\n".join(md), csv_rows


def _row_cells(best: dict, keys: Sequence[tuple], csv_rows: list,
               paired: dict | None = None) -> list[str]:
  """A table row's cells ("—" where a key has no row); the rows shown also go to the CSV."""
  cells = []
  for key in keys:
    if key not in best:
      cells.append("—")
      continue
    cell, delta = _cell(best, key)
    cells.append(cell)
    csv_rows.append(_csv_row(best, key, delta, paired))
  return cells


def _compat_metrics(best: dict, model: str, task: str) -> list[str]:
  """The task's metrics under published rules that the rows hold, in the task's order."""
  known = TASKS[task].compat_metric_names if task in TASKS else ()
  have = {k[4] for k in best if k[:2] == (model, task)}
  return [m for m in known if m in have]


def _compat_table(best: dict, model: str, task: str, metrics: Sequence[str],
                  csv_rows: list, paired: dict | None = None) -> list[str]:
  """The second table of a task: metric × variant rows, scored as published tables are."""
  keys = [k for k in best if k[:2] == (model, task) and k[4] in metrics]
  variants, langs = _variants(keys), _langs(keys)
  md = [f"#### {task} — scored as published tables (lm-eval-harness / MLQA rules)"
        f"{f' — {model}' if model else ''}\n",
        f"Rules of {COMPAT_SOURCE.get(task, 'published tables')}.\n",
        "| metric | variant | " + " | ".join(langs) + " |",
        "|---|---|" + "---|" * len(langs)]
  for metric in metrics:
    for v in variants:
      cells = _row_cells(best, [(model, task, v, lang, metric) for lang in langs], csv_rows,
                         paired)
      md.append(f"| {metric}{' (%)' if metric in FRACTIONS else ''} | {v} | "
                + " | ".join(cells) + " |")
  md.append("\nThe same checkpoints and test items as the table above, scored under the "
            "published rules (with our prompts and decoding; docs/tasks.md lists what else "
            "differs from a harness run). Brackets, parentheses and † as above.\n")
  return md


def train_cuts(workdirs: Sequence[str]) -> str:
  """Markdown lines: training examples that train.seq_len truncated or dropped, per variant,
  source and language (from the last train log row); '' when nothing was cut."""
  lines = []
  for wd in map(Workdir, workdirs):
    for variant in wd.variants_trained():
      log = read_metrics([wd.train_log(variant)])
      cut = log[-1].get("seq_len_cut") if log else None
      for source, langs in sorted((cut or {}).items()):
        for lang, c in sorted(langs.items()):
          lines.append(f"- {variant}: {source}/{lang}: {c['truncated']} truncated, "
                       f"{c['dropped']} dropped of {c['of']}")
  if not lines:
    return ""
  return ("\n### Training examples cut by train.seq_len\n\n" + "\n".join(lines)
          + "\n\nTruncated examples lost the end of their target, dropped ones a prompt of "
          "seq_len tokens or more; raise train.seq_len to keep them.\n")


def measured(stage: str, wd: Workdir, fn: Callable[[], object]):
  """Runs `fn` (a stage) and appends its row to resources.jsonl (process 0's wall time and
  resident peak: stt_jax.memory.Peak); returns what `fn` returns."""
  start = time.perf_counter()
  with memory.Peak() as peak:
    out = fn()
  row = {"stage": stage, "seconds": round(time.perf_counter() - start, 1),
         "peak_rss_gib": round(peak.bytes / memory.GIB, 2),
         "end_rss_gib": round(peak.end_bytes / memory.GIB, 2), "peak_since": peak.since,
         "time": time.time()}
  logging.info("%s: %.0f s, peak RSS %.2f GiB (since %s start), %.2f GiB at the end", stage,
               row["seconds"], row["peak_rss_gib"], peak.since, row["end_rss_gib"])
  if hosts.is_main():
    path = wd.resources
    appendlog.cut_torn_tail(path)  # Left by a run killed while writing its row.
    appendlog.append(path, [row], "report.resources")
  return out


def resources(workdirs: Sequence[str]) -> str:
  """Markdown: each stage's wall time (all its runs) and the highest resident peak any run of
  it reached; '' when no stage has recorded one."""
  md = []
  for wd in map(Workdir, workdirs):
    stages: dict[str, dict] = {}
    for r in read_metrics([wd.resources]):
      s = stages.setdefault(r["stage"], {"seconds": 0.0, "peak": 0.0, "runs": 0, "since": set()})
      s["seconds"] += r["seconds"]
      s["peak"] = max(s["peak"], r["peak_rss_gib"])
      s["runs"] += 1
      s["since"].add(r["peak_since"])
    if not stages:
      continue
    title = f" ({os.path.basename(wd.root)})" if len(workdirs) > 1 else ""
    md.append(f"\n### Time and memory per stage{title}\n\n| stage | runs | wall time | "
              "peak RSS (GiB) |\n|---|---|---|---|")
    for name, s in stages.items():
      minutes, seconds = divmod(round(s["seconds"]), 60)
      mark = "" if s["since"] == {"stage"} else " ‡"
      md.append(f"| {name} | {s['runs']} | {minutes} min {seconds:02d} s | "
                f"{s['peak']:.2f}{mark} |")
    md.append("\nPeak RSS: the most resident memory of the pipeline process (process 0) while "
              "the stage ran (Linux VmHWM, reset at each stage's start); ‡: the reset was not "
              "permitted, so the number is the process's peak so far. The report stage's own "
              "row is written after this file.")
  return "\n".join(md) + ("\n" if md else "")


def plot(rows: Sequence[dict], path: str) -> str | None:
  """Per-language grouped bars with 95% intervals per (model, task); plus accuracy vs model
  size when several models share the rows (the paper's Figure 2)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  best = latest(rows)
  groups = sorted({(k[0], k[1]) for k in best})
  if not groups:
    return None
  models = sorted({k[0] for k in best}, key=lambda m: _params(rows, m))
  size_plot = len(models) > 1
  ncols = len(groups) + (1 if size_plot else 0)
  fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
  for ax, (model, task) in zip(axes[0], groups):
    metric = PRIMARY.get(task, "accuracy")
    keys = [k for k in best if k[:2] == (model, task) and k[4] == metric]
    variants, langs = _variants(keys), _langs(keys)
    width = 0.8 / max(len(variants), 1)
    for j, v in enumerate(variants):
      xs, ys, errs = [], [], [[], []]
      for i, lang in enumerate(langs):
        r = best.get((model, task, v, lang, metric))
        if r is None:
          continue
        xs.append(i + j * width)
        ys.append(r["value"])
        errs[0].append(max(r["value"] - r["ci_low"], 0))
        errs[1].append(max(r["ci_high"] - r["value"], 0))
      ax.bar(xs, ys, width, yerr=errs, capsize=3, label=v, color=_color(v))
    ax.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(langs))], langs)
    ax.set_title(f"{task}{f' ({model})' if model else ''}")
    ax.set_ylabel(metric)
    ax.legend(fontsize=8)
  if size_plot:
    ax = axes[0][-1]
    task = groups[0][1]
    metric = PRIMARY.get(task, "accuracy")
    for v in _variants(best):
      pts = []
      for m in models:
        vals = [best[k]["value"] for k in best
                if k[0] == m and k[1] == task and k[2] == v and k[4] == metric and k[3] != "en"]
        if vals:
          pts.append((_params(rows, m), sum(vals) / len(vals)))
      if pts:
        ax.plot([p for p, _ in pts], [y for _, y in pts], marker="o", label=v, color=_color(v))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{task} {metric} (mean over target languages)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _color(variant: str) -> str:
  """The same colour for a variant in every panel."""
  order = list(VARIANT_ORDER)
  return f"C{order.index(variant) if variant in order else len(order) + hash(variant) % 5}"


def _params(rows, model) -> float:
  return next((r["params"] for r in rows if r.get("model", "") == model and r.get("params")),
              0.0)


def write_report(workdirs: Sequence[str], out_dir: str | None = None) -> str:
  """Writes report.md, report.csv, report.png and the pictures of report_plots (training loss,
  eval curves, translation filters) into out_dir (default: first workdir)."""
  evals = latest_evals(workdirs)
  rows = [r for ev in evals for r in ev.rows]
  out = Workdir(out_dir or workdirs[0])
  os.makedirs(out.root, exist_ok=True)
  md, csv_rows = table(rows, paired_stats(evals), label_shares(evals))
  md += train_cuts(workdirs)
  if rows:
    plot(rows, out.report("png"))
  runs, stats = {}, []
  for wd in map(Workdir, workdirs):
    cfg = read_json(wd.config)
    name = (model_label(ml_collections.ConfigDict(cfg)) if cfg and "model" in cfg
            else os.path.basename(wd.root))
    name = f"{name} ({os.path.basename(wd.root)})" if name in runs else name
    runs[name] = {v: read_metrics([wd.train_log(v)]) for v in wd.variants_trained()}
    stats += [s for s in map(read_json, wd.translation_stats()) if s]
  style = report_plots.Style(PRIMARY, VARIANT_ORDER, _color)
  md += report_plots.write_figures(out.report_figure, style, rows, runs, stats,
                                   out.report("png") if rows else None)
  md += resources(workdirs)
  with open(out.report("md"), "w", encoding="utf-8") as f:
    f.write("# Self-Translate-Train results\n\n" + (md if rows else "No metrics yet.\n" + md))
  buf = io.StringIO()
  csv.writer(buf).writerows(csv_rows)
  with open(out.report("csv"), "w", encoding="utf-8") as f:
    f.write(buf.getvalue())
  return md


def run(cfg, wd: Workdir, tokenizer=None) -> None:
  """The pipeline's last stage: prints the table (process 0) and where the files are."""
  del cfg, tokenizer
  if hosts.is_main():
    print(write_report([wd.root]))
    print(f"report: {wd.report('md')}, {os.path.basename(wd.report('png'))}")


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Results table and plot from eval metrics.")
  parser.add_argument("--workdir", action="append", required=True)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  print(write_report(args.workdir, args.out))


if __name__ == "__main__":
  main()
