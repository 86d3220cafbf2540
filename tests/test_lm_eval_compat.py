"""Scores under the rules of published tables (stt_jax/tasks/compat.py), worked by hand:
lm-eval's MGSM filters, its XNLI sentences, MLQA's and lm-eval's XQuAD F1; then the eval stage
writing them as extra rows and the report's second table."""

import json
import types

import ml_collections
import pytest

from stt_jax import run_config
from stt_jax import scoring
from stt_jax.stages import evaluate
from stt_jax.stages import report
from stt_jax.tasks import compat
from stt_jax.tasks import get_task
from stt_jax.tasks import metrics
from stt_jax.workdir import Workdir
from tests import hf_tiny


def _flexible(text):
  return compat.regex_filter(text, compat.MGSM_FLEXIBLE, pick=-1)


def _strict(text, lang):
  return compat.regex_filter(text, compat.MGSM_STRICT[lang])


@pytest.mark.parametrize("text,extracted", [
    ("It costs $1,234.", "$1,234."),  # "$", "," and "." all belong to the first group.
    ("She owes -5", "-5"),
    ("3 apples and 4 pears make 7", "7"),  # The last match wins; one digit: second group.
    ("so 7.", "7."),  # Two characters: the first group, with the full stop.
    ("The answer is 18. Let me check...", "..."),  # Dots alone are a match, and the last.
    ("no digits here", compat.INVALID),
    ("答案是 １８。", compat.INVALID),  # Full-width digits are not [0-9].
])
def test_flexible_extract_takes_the_last_match(text, extracted):
  assert _flexible(text) == extracted


@pytest.mark.parametrize("prediction,gold,same", [
    ("$1,234.", "1234", 1.0),
    ("-5", "5", 1.0),  # "-" is ASCII punctuation: the sign is dropped on both sides.
    ("-5", "-5", 1.0),
    ("1.5", "15", 1.0),
    ("...", "18", 0.0),
    ("18。", "18", 0.0),  # Only ASCII punctuation goes.
    (compat.INVALID, "18", 0.0),
])
def test_exact_match_ignores_case_and_ascii_punctuation(prediction, gold, same):
  assert compat.loose_exact_match(prediction, gold) == same


@pytest.mark.parametrize("lang,text", [
    ("en", "So 6 + 12 = 18. The answer is 18."),
    ("de", "Also 6 + 12 = 18. Die Antwort lautet 18."),
    ("ru", "Значит, 6 + 12 = 18. Ответ — 18."),
    ("th", "ดังนั้น 6 + 12 = 18 คำตอบคือ 18"),
    ("zh", "所以 6 + 12 = 18。答案是 18。"),
])
def test_each_languages_strict_pattern(lang, text):
  assert compat.loose_exact_match(_strict(text, lang), "18") == 1.0
  scores = get_task("mgsm").compat_scores(text, {"lang": lang, "answer_number": 18})
  assert scores == {"lm_eval_strict_match": 1.0, "lm_eval_flexible_extract": 1.0}


@pytest.mark.parametrize("lang,text", [
    ("de", "die antwort lautet 18"),  # The pattern is case-sensitive.
    ("de", "Die Antwort ist 18."),  # Our own reader accepts "ist"; the harness does not.
    ("ru", "Ответ: 18"),
    ("ru", "Ответ - 18"),  # A hyphen, not the em dash.
    ("th", "คำตอบคือ18"),  # No space.
    ("zh", "答案是18。"),  # No space.
    ("zh", "答案是 18"),  # No full stop "。".
    ("en", "the answer is 18"),
])
def test_strict_match_misses_near_forms(lang, text):
  assert _strict(text, lang) == compat.INVALID
  assert compat.loose_exact_match(_flexible(text), "18") == 1.0  # flexible still finds it.


def test_strict_takes_the_first_answer_flexible_the_last_number():
  text = "Die Antwort lautet 5. Probe: 5 + 3 = 8"
  assert _strict(text, "de") == "5."
  assert get_task("mgsm").compat_scores(text, {"lang": "de", "answer_number": 5}) == {
      "lm_eval_strict_match": 1.0, "lm_eval_flexible_extract": 0.0}
  assert _strict("Die Antwort lautet 4. Nein: Die Antwort lautet 5.", "de") == "4."


def test_mgsm_target_is_the_number_as_text():
  text = "The answer is 1,080."
  assert compat.mgsm_scores(text, 1080, "en")["lm_eval_strict_match"] == 1.0
  assert compat.mgsm_scores("The answer is 1080.0", 1080, "en") == {
      "lm_eval_strict_match": 0.0, "lm_eval_flexible_extract": 0.0}  # "10800" != "1080"
  with pytest.raises(ValueError, match="eval.lm_eval_compat=False"):
    compat.mgsm_scores(text, 1080, "fr")


@pytest.mark.parametrize("lang,sentences", [
    ("en", ("P, right? Yes, H", "P, right? Also, H", "P, right? No, H")),
    ("de", ("P, richtig? Ja, H", "P, richtig? Auch, H", "P, richtig? Nein, H")),
    ("ru", ("P, правильно? Да, H", "P, правильно? Так, H", "P, правильно? Нет, H")),
    ("th", ("P, ถูกต้อง? ใช่, H", "P, ถูกต้อง? ดังนั้น, H", "P, ถูกต้อง? ไม่, H")),
    ("zh", ("P, 正确? 是的, H", "P, 正确? 所以, H", "P, 正确? 不是的, H")),
])
def test_xnli_sentences_per_language(lang, sentences):
  """Context + each continuation is the harness's choice, after its target delimiter ' '."""
  context, continuations = compat.xnli_choices("P", "H", lang)
  assert context.endswith("?") and len(continuations) == 3
  assert [context + c for c in continuations] == [" " + s for s in sentences]


def test_xnli_ranks_its_sentences_and_scores_the_gold_label():
  task = get_task("xnli")
  rows = task.load("test", "de", limit=6)
  # A fake model that likes "Nein": every row gets 'contradiction'.
  fake = lambda prompts, conts: [float(c.startswith(" Nein")) for c in conts]
  choices = task.rank_compat_choices(rows, fake)
  assert choices == [2] * 6
  per_row = scoring.example_scores(task, [""] * 6, rows, choices, True)
  assert [s["lm_eval_acc"] for s in per_row] == [
      float(r["label"] == "contradiction") for r in rows]
  assert 0 < sum(s["lm_eval_acc"] for s in per_row) < 6
  # Ties go to the earlier choice, and each row may have its own number of continuations.
  assert metrics.rank_each([("a", ["x", "y"]), ("b", ["x", "y", "z"])],
                           lambda p, c: [0.0, 0.0, -1.0, 0.0, 0.5]) == [0, 2]
  assert task.compat_choices(rows[0])[0] == f" {rows[0]['premise']}, richtig?"


def test_mlqa_mixed_segmentation_zh():
  assert compat.mixed_segmentation("2008年北京 olympic games", "zh") == [
      "2008", "年", "北", "京", "olympic", "games"]
  # MLQA's range ends at U+9FA5: a later CJK character stays inside its run.
  assert compat.mixed_segmentation("ab\u9fa6c 北", "zh") == ["ab\u9fa6c", "北"]
  assert compat.mixed_segmentation("ไทย 2020", "th") == ["ไ", "ท", "ย", "2020"]
  assert compat.mixed_segmentation("Москва сити", "ru") == ["Москва", "сити"]


@pytest.mark.parametrize("text,lang,normalized", [
    ("Der Große Krieg!", "de", "große krieg"),  # German articles go.
    ("The Beatles", "en", "beatles"),
    ("the Beatles", "ru", "the beatles"),  # No article rule for ru.
    ("«Москва»", "ru", "москва"),  # Unicode punctuation goes (ASCII and P*).
    ("北京市。", "zh", "北 京 市"),
    ("2008年", "zh", "2008 年"),
])
def test_mlqa_normalisation(text, lang, normalized):
  assert compat.mlqa_normalize(text, lang) == normalized


def test_mlqa_f1_by_hand():
  # de: "die" is an article: 2 pred tokens, 1 gold, 1 shared: P 1/2, R 1, F1 2/3.
  de = compat.mlqa_scores("die Hauptstadt Berlin", ["Berlin"], "de")
  assert de["mlqa_f1"] == pytest.approx(200 / 3) and de["mlqa_exact_match"] == 0
  # Our own F1 keeps "die": P 1/3, R 1, F1 1/2.
  assert metrics.token_f1("die Hauptstadt Berlin", "Berlin", "de") == pytest.approx(0.5)
  # zh: 北 京 市 vs 北 京: P 2/3, R 1, F1 4/5.
  assert compat.mlqa_scores("北京市", ["北京"], "zh")["mlqa_f1"] == pytest.approx(80)
  assert compat.mlqa_scores("2008 年", ["2008年"], "zh")["mlqa_exact_match"] == 100
  # th: 9 characters (ท twice) against ไ ท ย: 3 shared, P 1/3, R 1, F1 1/2.
  assert compat.mlqa_scores("ประเทศไทย", ["ไทย"], "th")["mlqa_f1"] == pytest.approx(50)
  # The max over gold answers; empty against empty is 0 F1 (but equal strings).
  assert compat.mlqa_scores("city of Paris", ["Paris", "the city of Paris"], "en") == {
      "mlqa_exact_match": 100, "mlqa_f1": 100}
  assert compat.mlqa_scores("!", ["?"], "en") == {"mlqa_exact_match": 100, "mlqa_f1": 0}
  with pytest.raises(ValueError, match="eval.lm_eval_compat=False"):
    compat.mlqa_normalize("x", "fr")


def test_lm_eval_xquad_uses_the_first_gold_and_whitespace_words():
  # Only "Paris" counts: 3 pred tokens, 1 shared: P 1/3, R 1, F1 1/2.
  assert compat.lm_eval_xquad_scores("city of Paris", ["Paris", "the city of Paris"]) == {
      "lm_eval_exact_match": 0, "lm_eval_f1": pytest.approx(50)}
  # One token each in unspaced Chinese, and "。" is not ASCII punctuation.
  assert compat.lm_eval_xquad_scores("北京市", ["北京"])["lm_eval_f1"] == 0
  assert compat.lm_eval_xquad_scores("北京。", ["北京"])["lm_eval_exact_match"] == 0
  assert compat.mlqa_scores("北京。", ["北京"], "zh")["mlqa_exact_match"] == 100
  assert compat.lm_eval_xquad_scores("!", ["?"])["lm_eval_f1"] == 100  # Both empty.


def test_generation_tasks_score_their_predictions():
  xquad = get_task("xquad")
  row = {"lang": "zh", "answers": [{"text": "北京", "answer_start": 0}]}
  got = scoring.example_scores(xquad, ["北京市\nmore text"], [row], [None], True)[0]
  assert got["mlqa_f1"] == pytest.approx(80) and got["lm_eval_f1"] == 0
  assert set(got) == set(xquad.metric_names + xquad.compat_metric_names)
  mgsm = get_task("mgsm")
  plain = scoring.example_scores(mgsm, ["Ответ: 18"], [{"lang": "ru", "answer_number": 18}],
                                 [None], False)[0]
  assert plain == {"accuracy": 1.0}  # Compat off: our metric only.


LANGS = ("en", "de", "ru", "th", "zh")


def test_real_rows():
  """The native MGSM exemplars end in their language's answer sentence: strict-match reads 39
  of 40 (one German exemplar says 'Die Antwort ist 11.'), flexible-extract all 40. Every gold
  XQuAD answer scores 100 against itself under both XQuAD rules, in every language."""
  mgsm, xquad = get_task("mgsm"), get_task("xquad")
  missed, found = [], 0
  for lang in LANGS:
    for row in mgsm.load("exemplars", lang, strict=True):
      scores = mgsm.compat_scores(row["rationale"], row)
      found += scores["lm_eval_flexible_extract"]
      if not scores["lm_eval_strict_match"]:
        missed.append((lang, row["rationale"].rsplit(". ", 1)[-1]))
  assert found == 40 and missed == [("de", "Die Antwort ist 11.")]
  for lang in LANGS:
    rows = xquad.load("test", lang, strict=True)
    for row in rows:
      scores = xquad.compat_scores(row["answers"][0]["text"], row)
      assert set(scores.values()) == {100.0}, (lang, row["id"], scores)


def test_config_switch_is_a_validated_bool():
  cfg = run_config.get_config()
  assert cfg.eval.lm_eval_compat is True
  run_config.validate(cfg)
  raw = cfg.to_dict()
  raw["eval"]["lm_eval_compat"] = "no"
  with pytest.raises(run_config.ConfigKeyError,
                     match=r"^config: 'eval.lm_eval_compat' must be a bool, got 'no'$"):
    run_config.validate(ml_collections.ConfigDict(raw))


def test_preflight_names_the_switch_for_a_language_without_rules():
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  nli = {"lang": "fr", "premise": "p", "hypothesis": "h", "label": "neutral"}
  for name, row in (("mgsm", {"lang": "fr", "answer_number": 1}), ("xnli", nli),
                    ("xquad", {"lang": "fr", "answers": [{"text": "a", "answer_start": 0}]})):
    with pytest.raises(preflight.PreflightError,
                       match=r"^config: .*'fr'.*; set eval.lm_eval_compat=False$"):
      preflight.check_compat(get_task(name), row)
  preflight.check_compat(get_task("xnli"), dict(nli, lang="th"))


def test_compat_pass_picks_what_whole_sentences_pick(tmp_path):
  """The harness scores each of the three sentences whole; we run the shared context once
  and rank what follows '?'. On a random tiny model both pick the same label. (The byte
  tokenizer adds no BOS, so the first byte stands in for one.)"""
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  model, _ = load_hf(hf_tiny.make_tiny("llama_gqa", str(tmp_path / "m"), num_hidden_layers=1))
  score_fn = scoring.loglik_fn(model, hf_tiny.byte_tokenizer(), batch_size=4)
  task = get_task("xnli")
  rows = [{"lang": lang, "premise": p, "hypothesis": h, "label": "neutral"}
          for lang, p, h in (("de", "Ein Hund bellt.", "Ein Tier ist laut."),
                             ("ru", "Собака лает.", "Кошка спит."),
                             ("th", "หมาเห่า", "แมวนอน"),
                             ("zh", "狗在叫。", "动物很吵。"))]
  whole = [(c[:1], [(c + x)[1:] for x in xs]) for c, xs in map(task.compat_choices, rows)]
  picks = task.rank_compat_choices(rows, score_fn)
  assert picks == metrics.rank_each(whole, score_fn)
  assert len(set(picks)) > 1  # The scores depend on the text, not on a position.


def test_eval_stage_writes_compat_rows(tmp_path, monkeypatch):
  """score_model with a fake log-likelihood: our accuracy, lm_eval_acc from the extra pass
  (method 'loglik', nothing cut), the pick in the predictions file; then the switch off."""
  def fake_loglik(model, tokenizer, batch_size, mesh, kv_dtype=None, desc=None):
    del model, tokenizer, batch_size, mesh, kv_dtype, desc
    # Ours ranks " entailment"...; lm-eval's form " Ja, ..." / " Auch, ..." / " Nein, ...".
    return lambda prompts, conts: [float(c.startswith((" neutral", " Nein"))) for c in conts]
  monkeypatch.setattr(scoring, "loglik_fn", fake_loglik)
  model = types.SimpleNamespace(config=types.SimpleNamespace(num_params=lambda: 1000))
  cfg = run_config.get_config()
  cfg.task.name, cfg.eval.langs, cfg.eval.limit = "xnli", ("de",), 6
  cfg.eval.method, cfg.eval.batch_size = "loglik", 4
  wd = Workdir(str(tmp_path / "w"))
  out = evaluate.MetricsFile(wd)
  task, test = get_task("xnli"), get_task("xnli").load("test", "de", limit=6)
  rows = evaluate.score_model(model, None, cfg, "zero_shot", 2, wd, None, out)
  assert [(r["metric"], r["method"]) for r in rows] == [("accuracy", "loglik"),
                                                         ("lm_eval_acc", "loglik")]
  ours, theirs = rows
  assert ours["value"] == sum(r["label"] == "neutral" for r in test) / 6
  assert theirs["value"] == sum(r["label"] == "contradiction" for r in test) / 6
  assert theirs["n"] == 6 and theirs["truncated"] == 0
  assert theirs["ci_low"] <= theirs["value"] <= theirs["ci_high"]
  with open(wd.predictions("zero_shot", 2, "xnli", "de"), encoding="utf-8") as f:
    written = [json.loads(line) for line in f]
  assert [(w["prediction"], w["lm_eval_choice"]) for w in written] == [("neutral", 2)] * 6
  assert [w["label"] for w in written] == [r["label"] for r in test]  # The gold label.
  assert [w["lm_eval_acc"] for w in written] == [
      float(r["label"] == "contradiction") for r in test]
  out.append(rows)
  assert ("zero_shot", 2, "xnli", "de") in out.scored(evaluate.metric_names(cfg, task))
  cfg.eval.lm_eval_compat = False
  assert evaluate.metric_names(cfg, task) == ("accuracy",)
  assert [r["metric"] for r in evaluate.score_model(model, None, cfg, "zero_shot", 4, wd,
                                                    None, out)] == ["accuracy"]


def _row(metric, variant, lang, value, task="xnli"):
  return {"variant": variant, "step": 4, "task": task, "lang": lang, "metric": metric,
          "value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 50, "model": "m"}


def test_report_adds_a_labelled_second_table():
  rows = [_row("accuracy", "zero_shot", "de", 0.5), _row("accuracy", "self_translate", "de", 0.6),
          _row("lm_eval_acc", "zero_shot", "de", 0.4),
          _row("lm_eval_acc", "self_translate", "de", 0.45),
          _row("f1", "zero_shot", "zh", 60.0, "xquad"),
          _row("mlqa_f1", "zero_shot", "zh", 55.0, "xquad")]
  md, csv_rows = report.table(rows)
  assert "### xnli — accuracy (%) — m" in md
  assert "#### xnli — scored as published tables (lm-eval-harness / MLQA rules) — m" in md
  assert "lm-evaluation-harness `xnli_<lang>`" in md
  assert "| lm_eval_acc (%) | self_translate | 45.0 [35.0, 55.0] (+5.0) |" in md
  assert "| mlqa_f1 | zero_shot | 55.0 [54.9, 55.1] |" in md  # F1 stays on 0-100.
  assert "| self_translate | 60.0 [50.0, 70.0] (+10.0) |" in md  # Our table is unchanged.
  assert md.index("### xnli") < md.index("#### xnli") < md.index("### xquad")
  assert {(r[2], r[3]) for r in csv_rows[1:] if r[1] == "xnli"} == {
      (m, v) for m in ("accuracy", "lm_eval_acc") for v in ("zero_shot", "self_translate")}
  assert "published tables" not in report.table(rows[:2])[0]  # No compat rows, no table.
