"""The interface every task shares: sources, row checks, prompts, scoring.

A task module only declares where its splits live, how one raw row becomes a
checked example, the prompt/target format and the per-example metric; this
file does the rest the same way for all of them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
import pathlib
from typing import (Any, Callable, Iterable, Iterator, Mapping, Optional,
                    Sequence)

from stt_jax.tasks import metrics

# The repository's bundled data (data/ next to the package).
DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "data"
SOURCES = ("auto", "local", "hf", "tfds")
_MAX_LOGGED = 5
_log = logging.getLogger(__name__)

Example = dict[str, Any]
# (where, index, record or the error that spoiled it)
Record = tuple[str, int, Any]


class MalformedRow(ValueError):
  """A row that cannot be used; the message says what is wrong with it."""


class DataNotFoundError(FileNotFoundError):
  """No source could supply a split."""


class SubsetError(DataNotFoundError):
  """Only a partial bundled copy has the split, and the caller did not accept
  subsets (allow_subset=False)."""


@dataclasses.dataclass(frozen=True)
class Field:
  """A text field the self-translation stage must translate.

  multiline: translate line by line (split on '\\n', keep the line count).
  """
  name: str
  multiline: bool = False
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Split:
  """Where one split lives in each kind of source ({lang} is filled in).

  path: jsonl file under the bundled data/ or a user's data_dir.
  langs: languages the split exists in; None means any with a file.
  id_prefix: ids are f"{id_prefix}-{the row's own id}", else
    f"{id_prefix}-{row number}" (1-based); the same row number across
    languages gives the same id, which is how parallel rows are paired.
  hf: (dataset, config or None, split) for `datasets.load_dataset`.
  tfds: (name, split) for `tensorflow_datasets.load`.
  bundled_note: set when the bundled copy is partial; says what it holds. Such
    a copy is used only when the caller accepts subsets (Task.load
    allow_subset), so a paper run never trains on it by accident.
  """
  path: str
  id_prefix: str
  langs: Optional[tuple[str, ...]] = None
  hf: Optional[tuple[str, Optional[str], str]] = None
  tfds: Optional[tuple[str, str]] = None
  bundled_note: str = ""


class Rows(list):
  """Loaded examples, plus where they came from and which rows were skipped.

  `malformed` holds one "file:line: reason" string per skipped row.
  """

  def __init__(self, rows: Iterable[Example] = (), source: str = ""):
    super().__init__(rows)
    self.source = source
    self.malformed: list[str] = []

  @property
  def num_malformed(self) -> int:
    return len(self.malformed)


# ---------------------------------------------------------------------------
# Readers. Each returns an iterator of (where, index, record); opening happens
# eagerly so that a missing source fails before any row is read.


def read_jsonl(path: pathlib.Path) -> Iterator[Record]:
  """Rows of a jsonl file; a broken line becomes a MalformedRow record."""
  with open(path, encoding="utf-8") as f:
    index = 0
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        record = MalformedRow(f"broken JSON ({e.msg} at column {e.colno})")
      if not isinstance(record, (dict, MalformedRow)):
        record = MalformedRow("line is not a JSON object")
      yield f"{path}:{lineno}", index, record
      index += 1


def _open_jsonl(path: pathlib.Path) -> Iterator[Record]:
  if not path.is_file():
    raise FileNotFoundError(path)
  return read_jsonl(path)


def _open_hf(name: str, config: Optional[str],
             split: str) -> Iterator[Record]:
  import datasets  # pylint: disable=g-import-not-at-top  # optional
  dataset = datasets.load_dataset(name, config, split=split)
  label = f"hf:{name}" + (f"/{config}" if config else "") + f"[{split}]"
  return ((f"{label}#{i}", i, dict(r)) for i, r in enumerate(dataset))


def _plain(value: Any) -> Any:
  """TFDS numpy values -> str/int/list/dict."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return _plain(value.tolist())
  if isinstance(value, list):
    return [_plain(v) for v in value]
  return value


def _open_tfds(name: str, split: str) -> Iterator[Record]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset = tfds.as_numpy(tfds.load(name, split=split))
  label = f"tfds:{name}[{split}]"
  return ((f"{label}#{i}", i, _plain(r)) for i, r in enumerate(dataset))


# ---------------------------------------------------------------------------
# Row helpers for parse_row implementations.


def text(record: Mapping[str, Any], name: str) -> str:
  """A required, non-blank string field."""
  if name not in record or record[name] is None:
    raise MalformedRow(f"missing field {name!r}")
  value = record[name]
  if not isinstance(value, str) or not value.strip():
    raise MalformedRow(f"field {name!r} is not a non-empty string")
  return value


def number(record: Mapping[str, Any], name: str) -> metrics.Number:
  """A required numeric field; strings like '2,125' are accepted."""
  if name not in record or record[name] is None:
    raise MalformedRow(f"missing field {name!r}")
  value = record[name]
  if isinstance(value, bool):
    value = None
  elif isinstance(value, (int, float)):
    value = int(value) if float(value).is_integer() else value
  else:
    value = metrics.parse_number(str(value))
  if value is None:
    raise MalformedRow(f"field {name!r} is not a number: {record[name]!r}")
  return value


# ---------------------------------------------------------------------------


class Task:
  """One train-on-English / test-in-target-language task.

  Subclasses set the class attributes and implement parse_row,
  format_target, extract_answer and example_scores.
  """
  name: str = ""
  aliases: tuple[str, ...] = ()
  splits: Mapping[str, Split] = {}
  translatable_fields: tuple[Field, ...] = ()
  prompt_template: str = ""
  # Where greedy decoding of an answer should stop.
  stop_sequences: tuple[str, ...] = ("\n",)
  # Names of the metrics `score` returns; values are means over examples.
  metric_names: tuple[str, ...] = ()
  # Metrics under the rules of published tables (lm-eval-harness, MLQA;
  # compat.py), reported beside ours when eval.lm_eval_compat is on.
  compat_metric_names: tuple[str, ...] = ()
  # The closed answer set of a classification task (() for open answers): the report counts
  # how often each model predicts each label, which shows a model that learned a label prior.
  labels: tuple[str, ...] = ()

  # -- loading --------------------------------------------------------------

  def load(self, split: str, lang: str = "en", limit: Optional[int] = None,
           data_dir: Optional[str] = None, strict: bool = False,
           source: str = "auto", sample_seed: Optional[int] = None,
           allow_subset: Optional[bool] = None) -> Rows:
    """Loads `split` in `lang` as checked examples, each with a stable `id`.

    limit: the first `limit` rows; with `sample_seed`, a seeded random `limit`
    rows instead (kept in file order). Use the sample for training subsets:
    files such as the bundled MultiNLI are sorted by label, so their first
    rows are all one class.

    Sources, first that has the split wins: `data_dir` (same layout and
    schema as the bundled data/), the bundled data/, Hugging Face `datasets`,
    TFDS. `source` narrows that to "local" (the first two), "hf" or "tfds".

    allow_subset: whether a partial bundled copy (Split.bundled_note: SQuAD
    and MultiNLI train) may stand in for the full split. True: yes, quietly.
    None (the default, for callers that predate the flag): yes, with a
    warning. False: it is skipped, so `auto` goes on to HF datasets and TFDS
    for the full set, and SubsetError (one line) is raised when only the
    subset exists. Complete bundled splits are never affected.
    Malformed rows are skipped, logged and listed in `rows.malformed`; with
    strict=True the first one raises ValueError naming file:line.
    """
    spec = self._split(split, lang)
    where, records = self._open(split, spec, lang, data_dir, source,
                                allow_subset is not False)
    if (where.startswith(str(DATA_DIR)) and spec.bundled_note
        and allow_subset is None):
      _log.warning("%s %s: bundled copy is %s", self.name, split,
                   spec.bundled_note)
    rows = Rows(source=where)
    for place, index, record in records:
      try:
        if isinstance(record, MalformedRow):
          raise record
        rows.append(self._checked(record, split, lang, index, spec))
      except MalformedRow as e:
        problem = f"{place}: {e}"
        if strict:
          raise ValueError(f"{problem}. Fix or delete that row, or load with "
                           "strict=False to skip malformed rows.") from None
        rows.malformed.append(problem)
        continue
      if limit is not None and sample_seed is None and len(rows) >= limit:
        break
    if limit is not None and sample_seed is not None and len(rows) > limit:
      keep = sorted(random.Random(sample_seed).sample(range(len(rows)), limit))
      rows[:] = [rows[i] for i in keep]
    if rows.malformed:
      _log.warning("%s %s/%s: skipped %d malformed row(s): %s", self.name,
                   split, lang, rows.num_malformed,
                   "; ".join(rows.malformed[:_MAX_LOGGED]))
    return rows

  def load_parallel(self, split: str, langs: Sequence[str],
                    **load_kwargs) -> list[tuple[Example, ...]]:
    """Rows of `split` aligned across `langs` by id (the first lang's order).

    For few-shot translation prompts: MGSM 'exemplars' and XNLI 'dev' rows
    are translations of one another, so equal ids mean parallel text.
    """
    loaded = [self.load(split, lang, **load_kwargs) for lang in langs]
    by_id = [{row["id"]: row for row in rows} for rows in loaded[1:]]
    return [(row, *(other[row["id"]] for other in by_id))
            for row in loaded[0] if all(row["id"] in o for o in by_id)]

  def _split(self, split: str, lang: str) -> Split:
    if split not in self.splits:
      raise ValueError(f"{self.name} has no split {split!r}; "
                       f"splits: {', '.join(self.splits)}")
    spec = self.splits[split]
    if spec.langs is not None and lang not in spec.langs:
      raise ValueError(
          f"{self.name} {split!r} exists only in {', '.join(spec.langs)} "
          f"(not {lang!r}); target-language training data comes from the "
          "translate stage")
    return spec

  def _openers(self, spec: Split, lang: str, data_dir: Optional[str],
               source: str, allow_subset: bool = True
               ) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, opener) for each source in order of preference.

    A partial bundled copy is left out unless `allow_subset`.
    """
    if source not in SOURCES:
      raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    rel = spec.path.format(lang=lang)
    if source in ("auto", "local"):
      bundled = [DATA_DIR] if allow_subset or not spec.bundled_note else []
      for root in ([data_dir] if data_dir else []) + bundled:
        path = pathlib.Path(root) / rel
        yield str(path), lambda path=path: _open_jsonl(path)
    if source in ("auto", "hf") and spec.hf:
      name, config, split = spec.hf
      config = config.format(lang=lang) if config else None
      yield f"hf:{name}", lambda: _open_hf(name, config, split)
    if source in ("auto", "tfds") and spec.tfds:
      name, split = spec.tfds
      name = name.format(lang=lang)
      yield f"tfds:{name}", lambda: _open_tfds(name, split)

  def _open(self, split: str, spec: Split, lang: str,
            data_dir: Optional[str], source: str,
            allow_subset: bool = True) -> tuple[str, Any]:
    tried = []
    for label, opener in self._openers(spec, lang, data_dir, source,
                                       allow_subset):
      try:
        return label, opener()
      except FileNotFoundError:
        tried.append(f"{label} missing")
      # Any failure of an optional library (not installed, offline, unknown
      # config) just means: try the next source.
      except Exception as e:  # pylint: disable=broad-exception-caught
        tried.append(f"{label} failed ({type(e).__name__})")
    rel = spec.path.format(lang=lang)
    if (not allow_subset and source in ("auto", "local")
        and self.partial_copy(spec, lang)):
      raise SubsetError(
          f"{self.name} {split!r} [{lang}]: only the bundled data/{rel} has "
          f"it, and it is {spec.bundled_note.split('; use ')[0]} "
          f"({'; '.join(tried) or 'no other source tried'}); accept it with "
          "allow_subset=True (config: --config.task.allow_subset=True) or load "
          "the full set with source='hf' (--config.task.data_source=hf; or "
          f"tfds) or a data_dir holding {rel}")
    raise DataNotFoundError(
        f"No data for {self.name} {split!r} [{lang}] ({'; '.join(tried)}). "
        f"Supply it in one of three ways: the bundled data/{rel} in the repo, "
        f"--data_dir=<folder> holding {rel} in the same jsonl schema (see "
        "docs/tasks.md), or Hugging Face `datasets`/TFDS with network access"
        + (f" ({spec.hf[0]})" if spec.hf else "") + ".")

  def partial_copy(self, spec: Split, lang: str) -> Optional[pathlib.Path]:
    """The bundled file of `spec` in `lang` if it exists and is partial."""
    path = DATA_DIR / spec.path.format(lang=lang)
    return path if spec.bundled_note and path.is_file() else None

  def _checked(self, record: Mapping[str, Any], split: str, lang: str,
               index: int, spec: Split) -> Example:
    if not isinstance(record, Mapping):
      raise MalformedRow("row is not an object")
    native = record.get("id")
    key = native if native not in (None, "") else index + 1
    return {"id": f"{spec.id_prefix}-{key}", "lang": lang,
            **self.parse_row(record, split, lang)}

  def parse_row(self, record: Mapping[str, Any], split: str,
                lang: str) -> Example:
    """The task's fields of one raw row (any source's schema); raises
    MalformedRow."""
    raise NotImplementedError

  # -- translation ------------------------------------------------------------

  def get_text(self, example: Example, field: str) -> str:
    return example[field]

  def set_text(self, example: Example, field: str, value: str) -> None:
    example[field] = value

  def translatable_texts(self, example: Example) -> dict[str, str]:
    """The texts self-translation must translate, by field name."""
    return {f.name: self.get_text(example, f.name)
            for f in self.translatable_fields}

  def with_translations(self, example: Example, texts: Mapping[str, str],
                        lang: str) -> Example:
    """A copy of `example` in `lang` with the given fields replaced."""
    translated = copy.deepcopy(example)
    translated["lang"] = lang
    for field, value in texts.items():
      self.set_text(translated, field, value)
    return translated

  # -- prompts and scoring ----------------------------------------------------

  def format_prompt(self, example: Example) -> str:
    """The model input for training and evaluation (no chat template)."""
    return self.prompt_template.format_map(example)

  def format_target(self, example: Example) -> str:
    """The training continuation; starts with a space."""
    raise NotImplementedError

  def extract_answer(self, text: str, lang: str = "en") -> Any:
    """The answer in a model's generated text."""
    raise NotImplementedError

  def example_scores(self, prediction: str,
                     example: Example) -> dict[str, float]:
    """Each of `metric_names` for one generated text."""
    raise NotImplementedError

  def score(self, predictions: Sequence[str],
            examples: Sequence[Example]) -> dict[str, float]:
    """Mean of each metric over (generated text, example) pairs."""
    if len(predictions) != len(examples):
      raise ValueError(f"{len(predictions)} predictions for "
                       f"{len(examples)} examples")
    per_example = [self.example_scores(p, e)
                   for p, e in zip(predictions, examples)]
    return {name: metrics.mean([s[name] for s in per_example])
            for name in self.metric_names}

  def compat_choices(self, example: Example
                     ) -> Optional[tuple[str, list[str]]]:
    """(context, continuations) when the compat metrics rank continuations by
    log-likelihood instead of reading the generation; None otherwise."""
    del example
    return None

  def rank_compat_choices(self, examples: Sequence[Example],
                          score_fn: metrics.ScoreFn) -> Optional[list[int]]:
    """The best continuation of `compat_choices` per example (one score_fn
    call for all), or None for a task without them."""
    requests = [self.compat_choices(e) for e in examples]
    if not requests or requests[0] is None:
      return None
    return metrics.rank_each(requests, score_fn)

  def compat_scores(self, prediction: str, example: Example,
                    choice: Optional[int] = None) -> dict[str, float]:
    """Each of `compat_metric_names` for one generated text, or for the index
    of the continuation `rank_compat_choices` picked."""
    raise NotImplementedError
