"""The round-trip filter (variant self_translate_rt): keep rules, their validation, the back
pass of the translate stage (reversed exemplars, its own resumable cache) and the files, stats
and training rows it makes.

The stage tests use test_translate's fake decoder, which reverses each word: decoding its
output again gives back the English source exactly (chrF 100). `Lossy` loses words on the way
back for some segments, so the filter has something to drop.
"""

import json

import ml_collections
import pytest

from stt_jax import run_config, train_data, translate
from stt_jax import translate_roundtrip as rt
from stt_jax.report_plots import filter_data, roundtrip_table
from stt_jax.stages import train as train_stage
from stt_jax.stages import translate as stage
from stt_jax.workdir import Workdir
from tests.test_translate import FakeDecoder, outputs, read, small_config, tiny  # noqa: F401


class Lossy(FakeDecoder):
  """Back-translations (prompts ending in 'English:') of segments of 15 words or more keep only
  their first 3 words; the forward pass is the plain fake."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.prompts: list[str] = []

  def __call__(self, model, tokenizer, prompts, details=False, **kwargs):
    self.prompts += list(prompts)
    for i, done in super().__call__(model, tokenizer, prompts, details, **kwargs):
      if prompts[i].endswith("English:") and len(done.text.split()) >= 15:
        done = type(done)(" " + " ".join(done.text.split()[:3]), done.num_tokens, True)
      yield i, done


def rt_config(limit, **roundtrip):
  cfg = small_config(limit=limit)
  cfg.variants = ("zero_shot", "self_translate", "self_translate_rt")
  for k, v in roundtrip.items():
    setattr(cfg.translate.roundtrip, k, v)
  return cfg


def lines(workdir, name):
  return [json.loads(x) for x in read(workdir, name).splitlines()]


# ------------------------------------------------------------------------------ keep rules


def test_keep_rules():
  rule = ml_collections.ConfigDict({"min_chrf": 40.0, "keep_fraction": 0.0})
  scores = [80.0, 39.9, 40.0, 10.0, 40.0]
  assert rt.keep_mask(scores, rule) == [True, False, True, False, True]
  rule.min_chrf, rule.keep_fraction = 0.0, 0.5
  # ceil(0.5 x 5) = 3 best; the tie at 40.0 goes to the earlier rows.
  assert rt.keep_mask(scores, rule) == [True, False, True, False, True]
  rule.keep_fraction = 0.2
  assert rt.keep_mask(scores, rule) == [True, False, False, False, False]
  rule.keep_fraction = 1.0
  assert rt.keep_mask(scores, rule) == [True] * 5 and rt.keep_mask([], rule) == []
  stats = rt.summary([{"a": 80.0, "b": 50.0}, {"a": 20.0, "b": 90.0}], [True, False],
                     ("a", "b"), rule)
  assert stats["rule"] == {"keep_fraction": 1.0}
  assert (stats["checked"], stats["kept"], stats["dropped"]) == (2, 1, 1)
  assert stats["chrf"]["row_min"]["p50"] == 35.0 and stats["chrf"]["a"]["mean"] == 50.0


def test_chrf_per_field_and_reversed_prompt():
  scores = rt.field_chrf({"p": "A man walks his dog.", "h": "A cat sleeps."},
                         {"p": "A man walks his dog.", "h": "Rain falls."})
  assert scores["p"] == 100.0 and scores["h"] < 20
  cfg = run_config.get_config().translate
  pairs = [("Hello.", "Hallo.")]
  back = translate.build_prompt(rt.back_pairs(pairs), "Ein Hund.", "en", cfg, src="de")
  assert back == "German: Hallo.\nEnglish: Hello.\n\nGerman: Ein Hund.\nEnglish:"
  assert translate.prompt_id(pairs, "de", cfg) != translate.prompt_id(
      rt.back_pairs(pairs), "en", cfg, src="de")


@pytest.mark.parametrize("change,message", [
    (dict(min_chrf=40.0, keep_fraction=0.5), "set exactly one of them above 0"),
    (dict(min_chrf=0.0, keep_fraction=0.0), "set exactly one of them above 0"),
    (dict(min_chrf=120.0), "translate.roundtrip.min_chrf must be in [0, 100], got 120.0"),
    (dict(min_chrf=0.0, keep_fraction=1.5), "keep_fraction must be in [0, 1], got 1.5"),
    (dict(fields={"xnli": ("premise", "label"), "mgsm": ("question",), "xquad": ("context",)}),
     "translate.roundtrip.fields['xnli'] = ('premise', 'label'): name one or more of premise, "
     "hypothesis"),
])
def test_roundtrip_rule_validation(change, message):
  cfg = run_config.get_config()
  cfg.model.path = "/x"
  for k, v in change.items():
    setattr(cfg.translate.roundtrip, k, v)
  with pytest.raises(run_config.ConfigKeyError) as err:
    run_config.validate(cfg)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_default_variants_skip_the_roundtrip_pass():
  cfg = run_config.get_config()
  assert "self_translate_rt" in run_config.VARIANTS
  assert "self_translate_rt" not in cfg.variants and not stage.roundtrip_on(cfg)
  cfg.model.path = "/x"
  plain = stage.stamp(cfg, "de")
  cfg.translate.roundtrip.min_chrf = 55.0  # Not used: the stamp (so the files) stay.
  assert stage.stamp(cfg, "de") == plain and "roundtrip" not in plain
  cfg.variants = ("self_translate_rt",)
  with_rt = stage.stamp(cfg, "de")
  assert with_rt["roundtrip"]["min_chrf"] == 55.0
  # A marker without the pass does not cover a run that needs it; one with the pass covers a
  # later run of fewer variants; other round-trip settings redo the pass.
  assert not stage.up_to_date(plain, with_rt) and stage.up_to_date(with_rt, plain)
  assert stage.up_to_date(with_rt, with_rt) and not stage.up_to_date(None, plain)
  cfg.translate.roundtrip.min_chrf = 50.0
  assert not stage.up_to_date(with_rt, stage.stamp(cfg, "de"))


# ------------------------------------------------------------------------------ the stage


def test_roundtrip_pass_files_and_stats(tiny, tmp_path, monkeypatch):
  fake = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", fake)
  stats = stage.translate_task(*tiny, "xnli", "de", rt_config(6), tmp_path)
  rows = lines(tmp_path, "xnli_de.train.jsonl")
  scored = lines(tmp_path, "xnli_de.roundtrip.jsonl")
  kept = lines(tmp_path, "xnli_de.train_rt.jsonl")
  assert [r["id"] for r in scored] == [r["id"] for r in rows] and len(rows) == 6
  assert kept == [r for r, s in zip(rows, scored) if s["keep"]]
  assert all((min(s["chrf"].values()) >= 40) == s["keep"] for s in scored)
  assert 0 < len(kept) < len(rows)  # Long sentences lost words on the way back.
  r = stats["roundtrip"]
  assert (r["checked"], r["kept"], r["dropped"]) == (6, len(kept), 6 - len(kept))
  assert r["fields"] == ["premise", "hypothesis"] and r["rule"] == {"min_chrf": 40.0}
  assert set(r["chrf"]) == {"row_min", "premise", "hypothesis"}
  assert r["segments"]["decode"] == r["segments"]["decoded_this_run"] > 0
  assert json.loads(read(tmp_path, "xnli_de.stats.json"))["roundtrip"] == r
  # Back prompts: reversed exemplars, the target-language text, an open English line.
  back = [p for p in fake.prompts if p.endswith("English:")]
  assert len(back) == r["segments"]["decode"]
  assert back[0].startswith("German: ") and "\nEnglish: " in back[0]
  english = {f"{r['id']}.de": r for r in stage.english_rows(rt_config(6), "xnli")}
  for s in scored:  # chrF 100 exactly where the way back restored the source.
    for field, back_text in s["back"].items():
      same = back_text == " ".join(english[s["id"]][field].split())
      assert (s["chrf"][field] == 100.0) == same, (field, back_text)
  # keep_fraction: the best ceil(0.5 x 6) rows, from the same caches (nothing decoded).
  again = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", again)
  stats = stage.translate_task(*tiny, "xnli", "de", rt_config(6, min_chrf=0.0,
                                                                keep_fraction=0.5), tmp_path)
  assert again.prompts == [] and stats["roundtrip"]["kept"] == 3


def test_roundtrip_resume_after_crash(tiny, tmp_path, monkeypatch):
  """A crash in the back pass: the rerun decodes nothing forward again and only the missing
  back-translations; the files equal an uninterrupted run's; a third run decodes nothing."""
  cfg = rt_config(6)
  clean = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", clean)
  stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "clean")
  forward = [p for p in clean.prompts if not p.endswith("English:")]
  batches = -(-len(forward) // 4)  # FakeDecoder yields batches of 4.
  crash = Lossy(fail_after=batches + 1)  # One batch of the back pass is on disk.
  monkeypatch.setattr(translate.generation, "generate_stream", crash)
  with pytest.raises(RuntimeError, match="simulated crash"):
    stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  part = tmp_path / "run" / "translations" / "cache" / "xnli_de.back.part000.jsonl"
  assert len(part.read_text().splitlines()) == 4
  with open(part, "a", encoding="utf-8") as f:  # A write torn by kill -9.
    f.write('{"model": "tiny", "prompt": "x", "lang": "en", "src": "torn')
  assert not (tmp_path / "run" / "translations" / "xnli_de.train_rt.jsonl").exists()

  resume = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", resume)
  stats = stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  assert all(p.endswith("English:") for p in resume.prompts)
  assert len(resume.prompts) == stats["roundtrip"]["segments"]["decode"] - 4
  assert stats["roundtrip"]["segments"]["cached"] == 4
  for name in ("train.jsonl", "train_rt.jsonl", "roundtrip.jsonl"):
    assert read(tmp_path / "run", f"xnli_de.{name}") == read(tmp_path / "clean",
                                                             f"xnli_de.{name}")
  assert all(json.loads(x) for x in part.read_text().splitlines())  # Torn line cut off.

  again = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", again)
  stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  assert again.prompts == []


def test_no_roundtrip_without_its_variant(tiny, tmp_path, monkeypatch):
  fake = Lossy()
  monkeypatch.setattr(translate.generation, "generate_stream", fake)
  stats = stage.translate_task(*tiny, "xnli", "de", small_config(limit=3), tmp_path)
  assert "roundtrip" not in stats and not any(p.endswith("English:") for p in fake.prompts)
  files = {p.name for p in (tmp_path / "translations").rglob("*")}
  assert not {f for f in files if "back" in f or "_rt" in f or "roundtrip" in f}


@pytest.mark.parametrize("task,fields", [("mgsm", {"question", "rationale"}),
                                         ("xquad", {"context", "question"})])
def test_roundtrip_fields_of_mgsm_and_xquad(tiny, tmp_path, monkeypatch, task, fields):
  """MGSM: question and rationale (line by line; lines without letters are copied both
  ways); XQuAD: context and question, the answer span is kept as aligned."""
  monkeypatch.setattr(translate.generation, "generate_stream", FakeDecoder())
  cfg = rt_config(3)
  cfg.translate.filters.numbers_tasks = ()  # The fake reverses numbers too.
  stats = stage.translate_task(*tiny, task, "de", cfg, tmp_path)
  scored = lines(tmp_path, f"{task}_de.roundtrip.jsonl")
  assert len(scored) == stats["kept"] == 3 and stats["roundtrip"]["kept"] == 3
  assert all(set(s["chrf"]) == fields and set(s["chrf"].values()) == {100.0} for s in scored)
  assert lines(tmp_path, f"{task}_de.train_rt.jsonl") == lines(tmp_path, f"{task}_de.train.jsonl")


# ------------------------------------------------------------------------------ training rows


def test_rt_variant_trains_on_the_roundtrip_rows(tmp_path):
  rows = {"en": [{"id": 1}], "translated": [{"id": 2}], "translated_rt": [{"id": 3}]}
  assert train_data.rows_for_variant("self_translate_rt", rows) == {
      "en": [{"id": 1}], "translated": [{"id": 3}]}
  with pytest.raises(train_data.DataError, match="needs rows for translated_rt"):
    train_data.rows_for_variant("self_translate_rt", {**rows, "translated_rt": []})
  cfg = small_config(limit=2)
  cfg.task.name, cfg.task.target_langs = "xnli", ("de",)
  wd = Workdir(str(tmp_path))
  (tmp_path / "translations").mkdir()
  with open(wd.translation("xnli", "de", "train_rt"), "w") as f:
    f.write(json.dumps({"id": "x.de", "lang": "de"}) + "\n")
  got = train_stage.rows_by_source(cfg, wd)
  assert got["translated_rt"] == [{"id": "x.de", "lang": "de"}] and got["translated"] == []


def test_filter_plot_and_table_count_roundtrip_drops():
  stats = [{"task": "xnli", "lang": "zh", "model": "m", "items": 10, "kept": 8,
            "dropped": {"script": 2},
            "roundtrip": {"fields": ["premise", "hypothesis"], "rule": {"min_chrf": 40.0},
                          "checked": 8, "kept": 5, "dropped": 3,
                          "chrf": {"row_min": {"p10": 12.0, "p50": 45.5, "p90": 70.0}}}}]
  assert filter_data(stats) == {"zh": {"kept": 5, "roundtrip": 3, "script": 2}}
  md = roundtrip_table(stats)
  assert "| xnli | zh | min_chrf 40 | 8 | 5 | 3 | 12.0 | 45.5 | 70.0 |" in md
  assert roundtrip_table([{**stats[0], "roundtrip": None}]) == ""
