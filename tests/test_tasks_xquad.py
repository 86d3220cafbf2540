"""XQuAD/SQuAD on the bundled rows: EM/F1, character F1 for zh/th, formats."""

import pytest

from stt_jax.tasks import get_task
from stt_jax.tasks import metrics

LANGS = ("en", "de", "ru", "th", "zh")
TASK = get_task("xquad")


@pytest.mark.parametrize("lang", LANGS)
def test_gold_scored_against_itself_is_100(lang):
  rows = TASK.load("test", lang, strict=True)
  assert len(rows) == 1190
  for row in rows:
    scores = TASK.score([row["answers"][0]["text"]], [row])
    assert scores == {"exact_match": 100.0, "f1": 100.0}, row["id"]


def test_xquad_ids_are_parallel_across_languages():
  ids = [r["id"] for r in TASK.load("test", "en")]
  assert len(set(ids)) == 1190
  for lang in LANGS:
    assert [r["id"] for r in TASK.load("test", lang)] == ids


def test_answer_starts_point_at_answers():
  for split, lang in [("train", "en"), ("test", "th")]:
    for row in TASK.load(split, lang, strict=True):
      answer = row["answers"][0]
      start = answer["answer_start"]
      assert row["context"][start:start + len(answer["text"])] == (
          answer["text"])


def _score(prediction, row_id, lang):
  row = next(r for r in TASK.load("test", lang) if r["id"] == row_id)
  return TASK.score([prediction], [row])


def test_partial_overlap_zh_is_character_level():
  # Gold "新英格兰爱国者队" = 8 characters. Prediction "英格兰队" = 4, all in
  # the gold: P = 4/4, R = 4/8, F1 = 2*1*0.5/1.5 = 2/3.
  scores = _score("英格兰队", "xquad-56beb7953aeaaa14008c92ad", "zh")
  assert scores["f1"] == pytest.approx(100 * 2 / 3)
  assert scores["exact_match"] == 0
  # Gold "卡万·肖特": the middle dot is punctuation, so 4 chars 卡万肖特.
  # Prediction "肖特是防守截锋" = 7 chars sharing 肖, 特: P = 2/7, R = 2/4,
  # F1 = 2*(2/7)*(1/2) / (2/7 + 1/2) = (2/7) / (11/14) = 4/11.
  scores = _score("肖特是防守截锋", "xquad-56beb4343aeaaa14008c925f", "zh")
  assert scores["f1"] == pytest.approx(100 * 4 / 11)


def test_partial_overlap_th_is_character_level():
  # Gold "พิตต์สเบิร์ก สตีลเลอร์ส": the space is dropped, leaving 12 + 10 = 22
  # characters (Thai vowel and tone marks count as characters). Prediction
  # "สตีลเลอร์ส" = its last 10 characters, all found in the gold:
  # P = 10/10, R = 10/22, F1 = 2*(10/22) / (1 + 10/22) = 20/32 = 0.625.
  scores = _score("สตีลเลอร์ส", "xquad-56d7018a0d65d214001982c2", "th")
  assert scores["f1"] == pytest.approx(62.5)
  assert scores["exact_match"] == 0
  # Whitespace tokens would have given a different answer (1 of 2 words):
  assert metrics.token_f1("สตีลเลอร์ส", "พิตต์สเบิร์ก สตีลเลอร์ส", "de") == (
      pytest.approx(2 / 3))


def test_partial_overlap_de_is_whitespace_tokens_without_article_removal():
  # Gold "die Pittsburgh Steelers" -> [die, pittsburgh, steelers]; German
  # articles are not removed. Prediction [pittsburgh, steelers]:
  # P = 2/2, R = 2/3, F1 = 2*(2/3) / (1 + 2/3) = 4/5.
  scores = _score("Pittsburgh Steelers", "xquad-56d7018a0d65d214001982c2",
                  "de")
  assert scores == {"exact_match": 0.0, "f1": pytest.approx(80.0)}
  # Gold "Luke Kuechly." -> [luke, kuechly] (final period stripped);
  # prediction [kuechly]: P = 1, R = 1/2, F1 = 2/3.
  scores = _score("Kuechly", "xquad-56d9992fdc89441400fdb59f", "de")
  assert scores["f1"] == pytest.approx(100 * 2 / 3)


def test_english_normalisation_drops_articles_and_punctuation():
  assert metrics.exact_match("The New England Patriots!",
                             "New England Patriots", "en") == 1.0
  assert metrics.normalize_answer("«Die» Steelers.", "de") == "die steelers"
  assert metrics.normalize_answer("新英格兰。", "zh") == "新英格兰"
  assert metrics.token_f1("", "", "en") == 1.0
  assert metrics.token_f1("x", "", "en") == 0.0


def test_max_over_gold_answers():
  row = {"lang": "en", "answers": [{"text": "Denver Broncos"},
                                   {"text": "the Broncos"}]}
  assert TASK.score(["Broncos"], [row]) == {
      "exact_match": 100.0, "f1": 100.0}


# (model output, lang, extracted span)
EXTRACTION_CASES = [
    (" 308\nQuestion: How many", "en", "308"),
    ("Kawann Short", "de", "Kawann Short"),
    ("\n  新英格兰爱国者队 \n", "zh", "新英格兰爱国者队"),
    (" คาวันน์ ชอร์ต\n\nContext:", "th", "คาวันน์ ชอร์ต"),
    (" Люк Кикли\n", "ru", "Люк Кикли"),
]


@pytest.mark.parametrize("text,lang,expected", EXTRACTION_CASES)
def test_extract_answer(text, lang, expected):
  assert TASK.extract_answer(text, lang) == expected


def test_prompt_and_target_exact_strings():
  row = TASK.load("train", limit=1)[0]
  assert row["id"] == "squad-5733be284776f41900661182"
  assert TASK.format_prompt(row) == (
      "Context: " + row["context"] + "\n"
      "Question: To whom did the Virgin Mary allegedly appear in 1858 in "
      "Lourdes France?\nAnswer:")
  assert row["context"].startswith("Architecturally, the school has a "
                                   "Catholic character.")
  assert TASK.format_target(row) == " Saint Bernadette Soubirous"
  zh = TASK.load("test", "zh", limit=1)[0]
  assert TASK.format_prompt(zh).endswith(
      "\nQuestion: 黑豹队的防守丢了多少分？\nAnswer:")
  assert TASK.format_target(zh) == " 308"


def test_with_translations_relocates_the_answer():
  assert [(f.name, f.multiline) for f in TASK.translatable_fields] == [
      ("context", True), ("question", False), ("answer", False)]
  row = TASK.load("train", limit=1)[0]
  assert TASK.translatable_texts(row)["answer"] == "Saint Bernadette Soubirous"
  texts = {"context": "Die Jungfrau erschien Bernadette Soubirous.",
           "question": "Wem?", "answer": "Bernadette Soubirous"}
  de = TASK.with_translations(row, texts, "de")
  assert de["answers"] == [{"text": "Bernadette Soubirous",
                            "answer_start": 22}]
  missing = TASK.with_translations(row, {**texts, "answer": "Maria"}, "de")
  assert missing["answers"][0]["answer_start"] == -1
  assert row["answers"][0]["answer_start"] == 515  # original untouched
