"""MGSM/GSM8K on the bundled rows: gold answers, formats, answer extraction."""

import re

import pytest

from stt_jax.tasks import get_task
from stt_jax.tasks import metrics
from stt_jax.tasks import mgsm

LANGS = ("en", "de", "ru", "th", "zh")
TASK = get_task("mgsm")


@pytest.fixture(scope="module")
def test_rows():
  return {lang: TASK.load("test", lang, strict=True) for lang in LANGS}


def _thai_digits(text):
  return text.translate(str.maketrans("0123456789", "๐๑๒๓๔๕๖๗๘๙"))


def _fullwidth(text):
  return text.translate(str.maketrans("0123456789,", "０１２３４５６７８９，"))


def _group(number, sep):
  return f"{number:,}".replace(",", sep)


# How a native answer sentence would write N (thousands separators, digits),
# with the phrase the MGSM exemplars use in that language.
NATIVE_SENTENCE = {
    "en": lambda n: f"The answer is {n:,}.",
    "de": lambda n: f"Die Antwort lautet {_group(n, '.')}.",
    "ru": lambda n: f"Ответ — {_group(n, chr(0x202f))}.",
    "th": lambda n: f"คำตอบคือ {_thai_digits(str(n))}",
    "zh": lambda n: f"答案是 {_fullwidth(f'{n:,}')}。",
}


@pytest.mark.parametrize("lang", LANGS)
def test_every_gold_answer_parses_and_round_trips(test_rows, lang):
  rows = test_rows[lang]
  assert len(rows) == 250 and rows.num_malformed == 0
  assert all(isinstance(r["answer_number"], int) for r in rows)
  # The 4 golds that the tsv wrote with thousands separators.
  assert [rows[i]["answer_number"] for i in (146, 201, 230, 249)] == [
      2125, 114200, 276000, 5600]
  for r in rows:
    n = r["answer_number"]
    assert TASK.extract_answer(TASK.format_target(r), lang) == n
    assert TASK.extract_answer(NATIVE_SENTENCE[lang](n), lang) == n, n


# Every thousands convention, each allowed in every language's answers.
GROUP_SEPARATORS = (",", ".", " ", "\u202f", "\u00a0", "\u2019", "'")
ANSWER_SENTENCES = {
    "en": "So she has {} apples left. The answer is {}.",
    "de": "Also hat sie noch {} Äpfel. Die Antwort lautet {}.",
    "ru": "Значит, у неё осталось {} яблок. Ответ — {}.",
    "th": "ดังนั้นเธอเหลือแอปเปิล {} ผล คำตอบคือ {}",
    "zh": "所以她还剩 {} 个苹果。答案是 {}。",
}


@pytest.mark.parametrize("lang", LANGS)
def test_every_gold_in_every_grouping_convention_parses_exactly(test_rows,
                                                                lang):
  big = [r for r in test_rows[lang] if r["answer_number"] >= 1000]
  assert len(big) == 23
  for r in test_rows[lang]:
    n = r["answer_number"]
    for sep in GROUP_SEPARATORS:
      written = _group(n, sep)
      text = ANSWER_SENTENCES[lang].format(written, written)
      assert TASK.extract_answer(text, lang) == n, (text, n)
      assert TASK.example_scores(text, r) == {"accuracy": 1.0}, text
      # Without the answer phrase the last number is the answer.
      head = text[:text.index(written) + len(written)]
      assert TASK.extract_answer(head + " ...", lang) == n, head
      assert metrics.find_numbers(f"{written} + 1 = {_group(n + 1, sep)}") == [
          n, 1, n + 1]


@pytest.mark.parametrize("text,expected", [
    ("1,5", 1.5), ("1.5", 1.5), ("0,25", 0.25), ("0.500", 0.5),
    ("1.2345", 1.2345), ("12,50", 12.5), ("1,000", 1000), ("1.000", 1000),
    ("1 000", 1000), ("1\u202f000", 1000), ("1’000", 1000),
    ("12.500.000", 12500000), ("1,000.5", 1000.5), ("1.000,5", 1000.5),
    ("１，２００", 1200), ("๑,๒๐๐", 1200), ("-1 200", -1200),
    ("0,250", 0.25), ("1,2500", 1.25), ("1,000 000", None),
])
def test_parse_number_grouping_rule(text, expected):
  """Three digits after a separator group, in every language; else decimal."""
  assert metrics.parse_number(text) == expected


def test_find_numbers_full_width_comma_lists_and_mixed_separators():
  assert metrics.find_numbers("分别是48，24和1，200。") == [48, 24, 1200]
  assert metrics.find_numbers("1,000.000 and 1.000,000") == [1000, 1000]
  assert metrics.find_numbers("In 2019 300 people came") == [2019, 300]


def test_mgsm_is_parallel_across_languages(test_rows):
  golds = [r["answer_number"] for r in test_rows["en"]]
  for lang in LANGS:
    assert [r["answer_number"] for r in test_rows[lang]] == golds
    assert [r["id"] for r in test_rows[lang]] == [
        f"mgsm-{i}" for i in range(1, 251)]


def _norm(question):
  question = question.replace("’", "'").replace("“", '"').replace("”", '"')
  return " ".join(question.lower().split())


def test_mgsm_en_golds_agree_with_gsm8k_test(test_rows):
  gsm8k = {_norm(r["question"]): r["answer_number"]
           for r in TASK.load("gsm8k_test", strict=True)}
  matched = [(r["answer_number"], gsm8k[_norm(r["question"])])
             for r in test_rows["en"] if _norm(r["question"]) in gsm8k]
  print(f"MGSM-en questions found in GSM8K test: {len(matched)}/250")
  assert len(matched) >= 245
  assert all(a == b for a, b in matched)


def test_gsm8k_rationale_strips_calculator_and_final_line():
  rows = TASK.load("train", limit=3, strict=True)
  assert rows[0]["rationale"] == (
      "Natalia sold 48/2 = 24 clips in May.\n"
      "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
      "The answer is 72.")
  assert rows[0]["answer_number"] == 72


def test_gsm8k_train_all_rows_clean():
  rows = TASK.load("train", strict=True)
  assert len(rows) == 7473
  for r in rows:
    assert "<<" not in r["rationale"] and "####" not in r["rationale"]
    assert "\n\n" not in r["rationale"]
    last = r["rationale"].splitlines()[-1]
    assert last == f"The answer is {r['answer_number']}."
  # Finals written "1,080" and negative finals both survive.
  golds = {r["answer_number"] for r in rows}
  assert 1080 in golds and 109200000 in golds


def test_gsm8k_negative_final_answer():
  rows = TASK.load("gsm8k_test", strict=True)
  negatives = [r["answer_number"] for r in rows if r["answer_number"] < 0]
  assert sorted(negatives) == [-10, -3]


def test_prompt_and_target_exact_strings():
  row = TASK.load("train", limit=1)[0]
  assert TASK.format_prompt(row) == (
      "Question: Natalia sold clips to 48 of her friends in April, and then "
      "she sold half as many clips in May. How many clips did Natalia sell "
      "altogether in April and May?\nAnswer:")
  assert TASK.format_target(row) == (
      " Natalia sold 48/2 = 24 clips in May.\n"
      "Natalia sold 48+24 = 72 clips altogether in April and May.\n"
      "The answer is 72.")
  de = TASK.load("test", "de", limit=1)[0]
  assert TASK.format_prompt(de) == (
      "Question: Janets Enten legen 16 Eier pro Tag. Sie isst drei jeden "
      "Morgen zum Frühstück und backt mit vier jeden Tag Muffins für ihre "
      "Freunde. Den Rest verkauft sie täglich auf dem Bauernmarkt für 2 "
      "US-Dollar pro frischem Entenei. Wie viel Dollar nimmt sie täglich auf "
      "dem Bauernmarkt ein?\nAnswer:")
  assert TASK.format_target(de) == " The answer is 18."


def test_exemplars_are_parallel_and_unprefixed():
  pairs = TASK.load_parallel("exemplars", LANGS, strict=True)
  assert len(pairs) == 8
  for group in pairs:
    assert len({r["id"] for r in group}) == 1
    assert len({r["answer_number"] for r in group}) == 1
    for r in group:
      # The language-specific "Question:"/"Step-by-Step Answer:" labels go.
      assert not re.match(r"^\D{1,40}[:：]", r["question"]), r["question"]
      assert not re.match(r"^\D{1,40}[:：]", r["rationale"]), r["rationale"]
      assert TASK.extract_answer(r["rationale"], r["lang"]) == (
          r["answer_number"])
  first = dict((r["lang"], r) for r in pairs[0])
  assert first["en"]["question"].startswith("Roger has 5 tennis balls.")
  assert first["de"]["rationale"].endswith("Die Antwort ist 11.")
  assert first["zh"]["question"].startswith("罗杰有 5 个网球。")


def test_translatable_fields_and_with_translations():
  assert [(f.name, f.multiline) for f in TASK.translatable_fields] == [
      ("question", False), ("rationale", True)]
  row = TASK.load("train", limit=1)[0]
  texts = TASK.translatable_texts(row)
  assert texts["rationale"].count("\n") == 2
  de = TASK.with_translations(row, {"question": "Frage?"}, "de")
  assert de["lang"] == "de" and de["question"] == "Frage?"
  assert de["id"] == row["id"] and row["lang"] == "en"


# (model output, lang, expected number): realistic generations.
EXTRACTION_CASES = [
    ("She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.", "en", 18),
    ("The answer is $1,234.50.", "en", 1234.5),
    ("It drops 5 degrees twice, so -10. The answer is -10.", "en", -10),
    ("3 + 2 = 5 cars.\nThe answer is 5", "en", 5),
    ("He pays 20 * 1.5 = 30 dollars in total.", "en", 30),
    ("The answer is 18.0.", "en", 18),
    ("There are 4 * 5 = 20 new ones, so 9 + 20 = 29 in all.", "en", 29),
    ("The answer is 2 000.", "en", 2000),
    ("Sie hat 16 - 3 - 4 = 9 Eier. 9 * 2 = 18. Die Antwort lautet 18.",
     "de", 18),
    ("Die Antwort ist 1.000 Euro.", "de", 1000),
    ("The answer is 1,200.", "de", 1200),
    ("Ответ — 1,000.", "ru", 1000),
    ("Ответ: 1.000 рублей.", "ru", 1000),
    ("Ответ — 2,5.", "ru", 2.5),
    ("Das sind 2,5 Stunden. Die Antwort lautet 2,5.", "de", 2.5),
    ("Die Antwort lautet: 114.200", "de", 114200),
    ("Insgesamt 3 + 2 = 5 Autos. The answer is 5.", "de", 5),
    ("у нее остается 16 - 3 - 4 = 9 яиц, 9 * 2 = 18. Ответ — 18.", "ru", 18),
    ("Ответ: 276\u00a0000 рублей.", "ru", 276000),
    ("Ответ — 5\u202f600.", "ru", 5600),
    ("Итого 7 + 2 = 9 игрушек. Ответ будет 9", "ru", 9),
    ("เธอมีไข่เหลือ 16 - 3 - 4 = 9 ฟอง 9 * 2 = 18 คำตอบคือ 18", "th", 18),
    ("คำตอบคือ ๑๘", "th", 18),
    ("คำตอบ: 2,125 บาท", "th", 2125),
    ("ดังนั้น 3 + 2 = 5 คัน", "th", 5),
    ("所以她每天赚 9 * 2 = 18 美元。答案是 18。", "zh", 18),
    ("答案是：１８。", "zh", 18),
    ("答案为 1，200 元", "zh", 1200),
    ("所以一共有 7 + 2 = 9 个玩具。", "zh", 9),
    ("答案是 -3。", "zh", -3),
]


@pytest.mark.parametrize("text,lang,expected", EXTRACTION_CASES)
def test_extract_answer(text, lang, expected):
  assert TASK.extract_answer(text, lang) == expected


def test_extract_answer_first_answer_phrase_wins_over_later_numbers():
  text = "The answer is 18.\n\nQuestion: Tom has 3 apples..."
  assert TASK.extract_answer(text, "en") == 18
  assert TASK.extract_answer("no numbers at all", "en") is None


def test_score_compares_numerically():
  rows = [{"lang": "en", "answer_number": 18},
          {"lang": "de", "answer_number": 1000},
          {"lang": "en", "answer_number": 3}]
  outputs = ["The answer is 18.0", "Die Antwort lautet 1.000.", "It is 4."]
  assert TASK.score(outputs, rows) == {"accuracy": pytest.approx(2 / 3)}
  assert metrics.numbers_equal(18, 18.0)
  assert not metrics.numbers_equal(None, 18)
  with pytest.raises(ValueError):
    TASK.score(outputs[:1], rows)


def test_answer_sentence_uses_canonical_number():
  assert mgsm.answer_sentence(18.0) == "The answer is 18."
  assert mgsm.answer_sentence(2.5) == "The answer is 2.5."
