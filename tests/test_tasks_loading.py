"""Task registry, data sources in order, malformed rows, HF/TFDS mapping."""

import json
import logging
import sys
import types

import pytest

from stt_jax import tasks
from stt_jax.tasks import get_task


def test_get_task_names_and_aliases():
  mgsm, xquad, xnli = (get_task(n) for n in ("mgsm", "xquad", "xnli"))
  assert get_task("gsm8k") is mgsm
  assert get_task("squad") is xquad
  assert get_task("mnli") is xnli and get_task("Multi-NLI") is xnli
  assert [t.name for t in tasks.TASKS.values()] == ["mgsm", "xquad", "xnli"]


def test_unknown_task_is_one_line_listing_known():
  with pytest.raises(ValueError) as e:
    get_task("gsm9k")
  message = str(e.value)
  assert "\n" not in message
  for name in ("mgsm", "xquad", "xnli", "gsm8k", "squad", "mnli"):
    assert name in message


def test_bad_split_and_language():
  with pytest.raises(ValueError, match="splits: train, dev, test"):
    get_task("xnli").load("validation", "en")
  with pytest.raises(ValueError, match="translate stage"):
    get_task("mgsm").load("train", "de")
  with pytest.raises(ValueError, match="source must be"):
    get_task("mgsm").load("test", "de", source="web")


def test_limit_and_source():
  rows = get_task("xnli").load("test", "th", limit=5)
  assert len(rows) == 5 and rows.num_malformed == 0
  assert rows.source == str(tasks.DATA_DIR / "xnli" / "xnli_test_th.jsonl")
  assert [r["id"] for r in rows] == [f"xnli-test-{i}" for i in range(1, 6)]
  assert all(r["lang"] == "th" for r in rows)


def _write(path, lines):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_data_dir_comes_before_bundled(tmp_path):
  _write(tmp_path / "mgsm" / "mgsm_de.jsonl",
         [json.dumps({"question": "Wie viel?", "answer_number": 7})])
  rows = get_task("mgsm").load("test", "de", data_dir=str(tmp_path))
  assert [(r["id"], r["answer_number"]) for r in rows] == [("mgsm-1", 7)]
  # A split the folder lacks still comes from the bundled data.
  assert len(get_task("mgsm").load("test", "ru", data_dir=str(tmp_path))) == (
      250)


def test_missing_data_is_one_line_naming_three_ways(tmp_path):
  with pytest.raises(tasks.DataNotFoundError) as e:
    get_task("mgsm").load("test", "sw", data_dir=str(tmp_path),
                          source="local")
  message = str(e.value)
  assert "\n" not in message
  assert "data/mgsm/mgsm_sw.jsonl" in message
  assert "--data_dir" in message
  assert "Hugging Face `datasets`/TFDS" in message and "juletxara/mgsm" in (
      message)


BAD_MGSM = [
    json.dumps({"question": "Good one?", "answer_number": 18}),
    '{"question": "broken", "answer_number": ',
    "",
    json.dumps({"question": "No gold?"}),
    json.dumps({"question": "Words?", "answer_number": "eighteen"}),
    json.dumps({"question": "Comma gold?", "answer_number": "2,125"}),
    json.dumps(["not", "an", "object"]),
]


def test_malformed_rows_counted_with_file_and_line(tmp_path, caplog):
  path = tmp_path / "mgsm" / "mgsm_xx.jsonl"
  _write(path, BAD_MGSM)
  with caplog.at_level(logging.WARNING):
    rows = get_task("mgsm").load("test", "xx", data_dir=str(tmp_path))
  assert [r["answer_number"] for r in rows] == [18, 2125]
  # Ids are row numbers, so they stay put when a row before is skipped.
  assert [r["id"] for r in rows] == ["mgsm-1", "mgsm-5"]
  assert rows.num_malformed == 4
  assert rows.malformed[0].startswith(f"{path}:2: broken JSON")
  assert rows.malformed[1] == f"{path}:4: missing field 'answer_number'"
  assert rows.malformed[2].startswith(f"{path}:5: field 'answer_number' is "
                                      "not a number")
  assert rows.malformed[3] == f"{path}:7: line is not a JSON object"
  assert "skipped 4 malformed row(s)" in caplog.text
  assert f"{path}:2" in caplog.text


def test_strict_raises_naming_file_line_and_fix(tmp_path):
  _write(tmp_path / "mgsm" / "mgsm_xx.jsonl", BAD_MGSM)
  with pytest.raises(ValueError) as e:
    get_task("mgsm").load("test", "xx", data_dir=str(tmp_path), strict=True)
  message = str(e.value)
  assert "mgsm_xx.jsonl:2: broken JSON" in message
  assert "Fix or delete that row" in message and "strict=False" in message


@pytest.mark.parametrize("task,split,row,reason", [
    ("xnli", "dev", {"premise": "p", "hypothesis": "h", "label": "maybe"},
     "label 'maybe'"),
    ("xnli", "dev", {"premise": "p", "label": 0}, "missing field 'hypothesis'"),
    ("xquad", "test", {"context": "c", "question": "q", "answers": []},
     "missing field 'answers'"),
    ("xquad", "test", {"context": "c", "question": " ", "answers": [
        {"text": "c", "answer_start": 0}]}, "'question' is not a non-empty"),
    ("mgsm", "exemplars", {"question": "Q: x", "answer_number": 1},
     "missing field 'answer'"),
])
def test_malformed_row_reasons(tmp_path, task, split, row, reason):
  spec = get_task(task).splits[split]
  _write(tmp_path / spec.path.format(lang="xx"), [json.dumps(row)])
  rows = get_task(task).load(split, "xx", data_dir=str(tmp_path))
  assert len(rows) == 0 and rows.num_malformed == 1
  assert reason in rows.malformed[0] and ":1: " in rows.malformed[0]


def test_gsm8k_answer_without_final_line_is_malformed(tmp_path):
  _write(tmp_path / "gsm8k" / "train.jsonl", [
      json.dumps({"question": "q?", "answer": "1+1=2\n#### 2"}),
      json.dumps({"question": "q?", "answer": "no final line"}),
      json.dumps({"question": "q?", "answer": "x\n#### two"}),
  ])
  rows = get_task("gsm8k").load("train", data_dir=str(tmp_path))
  assert len(rows) == 1 and rows[0]["rationale"] == "1+1=2\nThe answer is 2."
  assert [m.split(": ", 1)[1] for m in rows.malformed] == [
      "answer has no '#### N' line", "final answer is not a number: 'two'"]


def _fake_module(monkeypatch, name, **attrs):
  module = types.ModuleType(name)
  for key, value in attrs.items():
    setattr(module, key, value)
  monkeypatch.setitem(sys.modules, name, module)


def test_hf_datasets_rows_are_mapped_to_the_schema(monkeypatch, tmp_path):
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    if name == "rajpurkar/squad":
      return [{"id": "a1", "title": "T", "context": "Paris is big.",
               "question": "Which?", "answers": {
                   "text": ["Paris"], "answer_start": [0]}}]
    if name == "facebook/xnli":
      return [{"premise": "p", "hypothesis": "h", "label": 2},
              {"premise": "p", "hypothesis": "h", "label": -1}]
    raise ConnectionError("offline")

  _fake_module(monkeypatch, "datasets", load_dataset=load_dataset)
  squad = get_task("squad").load("train", data_dir=str(tmp_path), source="hf")
  assert squad.source == "hf:rajpurkar/squad"
  assert squad == [{"id": "squad-a1", "lang": "en", "title": "T",
                    "context": "Paris is big.", "question": "Which?",
                    "answers": [{"text": "Paris", "answer_start": 0}]}]
  rows = get_task("xnli").load("test", "sw", source="hf")
  assert [(r["id"], r["label"]) for r in rows] == [
      ("xnli-test-1", "contradiction")]
  assert rows.num_malformed == 1 and "hf:facebook/xnli/sw[test]#1" in (
      rows.malformed[0])
  assert calls[-1] == ("facebook/xnli", "sw", "test")
  # HF failing (offline) falls through to TFDS, then to the one-line error.
  _fake_module(monkeypatch, "tensorflow_datasets")  # no load(): fails too
  with pytest.raises(tasks.DataNotFoundError, match="ConnectionError"):
    get_task("xquad").load("test", "sw", data_dir=str(tmp_path))


def test_tfds_xnli_rows_pick_the_language(monkeypatch):
  record = {
      "premise": {"en": b"A man sleeps.", "de": b"Ein Mann schl\xc3\xa4ft."},
      "hypothesis": {"language": [b"de", b"en"],
                     "translation": [b"Er ist wach.", b"He is awake."]},
      "label": 2,
  }
  _fake_module(monkeypatch, "tensorflow_datasets",
               load=lambda name, split: [record], as_numpy=lambda ds: ds)
  rows = get_task("xnli").load("dev", "de", source="tfds")
  assert rows.source == "tfds:xnli"
  assert rows[0] == {"id": "xnli-dev-1", "lang": "de",
                     "premise": "Ein Mann schläft.",
                     "hypothesis": "Er ist wach.", "label": "contradiction"}


def test_every_task_declares_its_interface():
  for task in tasks.TASKS.values():
    assert "train" in task.splits and "test" in task.splits
    assert task.translatable_fields and task.metric_names
    assert task.prompt_template.endswith(":")
    for split in task.splits:
      lang = "en"
      row = task.load(split, lang, limit=1, strict=True)[0]
      assert task.format_target(row).startswith(" ")
      assert task.format_prompt(row).count("\n") >= 1


def test_sample_seed_draws_a_seeded_subset_in_file_order():
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  task = get_task("xnli")
  first = task.load("train", "en", limit=90)
  assert {r["label"] for r in first} == {"entailment"}  # The bundled file is sorted by label.
  sample = task.load("train", "en", limit=90, sample_seed=0)
  assert len(sample) == 90 and len({r["label"] for r in sample}) == 3
  assert [r["id"] for r in sample] == [r["id"] for r in task.load("train", "en", limit=90,
                                                                   sample_seed=0)]
  order = [int(r["id"].rsplit("-", 1)[1]) for r in sample]
  assert order == sorted(order)


# ------------------------------------------------------------------------------ partial copies


def _hf_answers(monkeypatch, rows):
  """A fake `datasets` that serves `rows` (None: offline) and records each call."""
  calls = []

  def load_dataset(name, config, split):
    calls.append(name)
    if rows is None:
      raise ConnectionError("offline")
    return rows

  _fake_module(monkeypatch, "datasets", load_dataset=load_dataset)
  _fake_module(monkeypatch, "tensorflow_datasets")  # no load(): fails too
  return calls


def test_only_the_two_train_copies_are_partial():
  partial = {(t.name, s) for t in tasks.TASKS.values() for s, spec in t.splits.items()
             if spec.bundled_note}
  assert partial == {("xnli", "train"), ("xquad", "train")}


def test_refusing_subsets_goes_to_the_hub_for_the_full_set(monkeypatch):
  calls = _hf_answers(monkeypatch, [{"premise": "p", "hypothesis": "h", "label": 0}] * 3)
  rows = get_task("xnli").load("train", "en", allow_subset=False)
  assert rows.source == "hf:nyu-mll/multi_nli" and len(rows) == 3
  assert calls == ["nyu-mll/multi_nli"]


def test_subset_refused_in_one_line_naming_both_fixes(monkeypatch):
  calls = _hf_answers(monkeypatch, None)
  with pytest.raises(tasks.DataNotFoundError) as e:
    get_task("squad").load("train", "en", allow_subset=False)
  message = str(e.value)
  assert type(e.value).__name__ == "SubsetError" and "\n" not in message
  assert "data/squad/train.jsonl" in message and "4370 of 87599" in message
  assert "allow_subset=True" in message and "data_source=hf" in message
  assert "hf:rajpurkar/squad failed (ConnectionError)" in message
  assert calls == ["rajpurkar/squad"]


def test_accepted_subset_is_bundled_first_and_warns_only_by_default(monkeypatch, caplog):
  calls = _hf_answers(monkeypatch, None)
  with caplog.at_level(logging.WARNING):
    quiet = get_task("xnli").load("train", "en", limit=2, allow_subset=True)
  assert quiet.source == str(tasks.DATA_DIR / "mnli" / "train.jsonl")
  assert "bundled copy" not in caplog.text
  with caplog.at_level(logging.WARNING):
    legacy = get_task("xnli").load("train", "en", limit=2)
  assert legacy.source == quiet.source and "bundled copy is a 9000-row" in caplog.text
  assert not calls  # The hub is never asked when the subset is accepted.


def test_complete_bundled_splits_and_data_dir_are_never_refused(monkeypatch, tmp_path):
  calls = _hf_answers(monkeypatch, None)
  for name, split, lang in (("mgsm", "train", "en"), ("mgsm", "test", "th"),
                            ("xnli", "test", "zh"), ("xquad", "test", "th")):
    rows = get_task(name).load(split, lang, limit=1, allow_subset=False)
    assert rows.source.startswith(str(tasks.DATA_DIR))
  _write(tmp_path / "mnli" / "train.jsonl",
         [json.dumps({"premise": "p", "hypothesis": "h", "label": "neutral"})])
  rows = get_task("xnli").load("train", "en", data_dir=str(tmp_path), allow_subset=False)
  assert rows.source == str(tmp_path / "mnli" / "train.jsonl")
  assert not calls
