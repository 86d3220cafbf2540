"""Filters on hand-written bad translations, sentence splitting, SQuAD answer re-alignment and
code-switch patterns (no model needed)."""

import pytest

from stt_jax import codeswitch
from stt_jax import translate_filters as tf

CFG = tf.FilterConfig(length_ratio={"default": (0.3, 3.0), "de": (0.5, 2.5),
                                    "zh": (0.1, 1.0), "th": (0.3, 2.2)})
SRC = "Roger has 5 tennis balls. He buys 2 more cans of tennis balls."


@pytest.mark.parametrize("lang,output,reason", [
    ("de", "", "empty"),
    ("de", "   ", "empty"),
    ("de", "Roger hat 5 Tennisbälle. Er kauft 2 Dosen mehr. Er kauft 2 Dosen mehr. "
           "Er kauft 2 Dosen mehr. Er kauft 2 Dosen mehr.", "repetition"),
    ("zh", "罗杰有5个网球网球网球网球网球网球网球网球网球", "repetition"),
    ("th", "โรเจอร์มีลูกเทนนิส ลูกเทนนิส ลูกเทนนิส ลูกเทนนิส ลูกเทนนิส", "repetition"),
    ("de", "Roger has 5 tennis balls. He buys 2 more cans of tennis balls.", "copy"),
    ("de", "roger has 5 tennis balls, he buys 2 more cans of tennis balls", "copy"),
    ("th", "Roger mee look tennis 5 look. Kao sue pem 2 kra-pong.", "script"),
    ("zh", "Roger有5个tennis balls. He buys 2 more cans.", "script"),
    ("ru", "Roger hat 5 Tennisbälle. Er kauft noch 2 Dosen.", "script"),
    ("de", "Roger hat Bälle.", "length_ratio"),
    ("zh", "罗杰有 5 个网球。他又买了 2 罐网球。" * 3 + "他现在有多少个网球呢？我们来算一算吧。",
     "length_ratio"),
])
def test_bad_outputs_are_caught_with_their_reason(lang, output, reason):
  assert tf.check(SRC, output, lang, CFG) == reason


@pytest.mark.parametrize("lang,output", [
    ("de", "Roger hat 5 Tennisbälle. Er kauft 2 weitere Dosen Tennisbälle."),
    ("zh", "罗杰有 5 个网球。他又买了 2 罐网球。"),
    ("th", "โรเจอร์มีลูกเทนนิส 5 ลูก เขาซื้อลูกเทนนิสเพิ่มอีก 2 กระป๋อง"),
    ("ru", "У Роджера 5 теннисных мячей. Он покупает ещё 2 банки мячей."),
    ("zh", "罗杰（Roger）有 5 个网球。他又买了 2 罐网球。"),  # some Latin is fine
])
def test_good_translations_pass(lang, output):
  assert tf.check(SRC, output, lang, CFG) is None


def test_short_sources_skip_copy_script_length_but_not_loops():
  assert tf.check("Denver Broncos", "Denver Broncos", "zh", CFG) is None
  assert tf.check("1945", "1945", "th", CFG) is None
  assert tf.check(SRC, "Roger", "zh", CFG, light=True) is None
  assert tf.check("Denver", "Den Den Den Den Den Den", "de", CFG) == "repetition"
  assert tf.check("Denver", "", "de", CFG) == "empty"


def test_truncated_flag_and_disabled_filters():
  good = "Roger hat 5 Tennisbälle. Er kauft 2 weitere Dosen Tennisbälle."
  assert tf.check(SRC, good, "de", CFG, truncated=True) == "truncated"
  off = tf.FilterConfig(enabled=("empty",))
  assert tf.check(SRC, SRC, "th", off) is None
  assert tf.check(SRC, "", "th", off) == "empty"


def test_repetition_in_the_source_is_not_a_loop():
  src = "Count: ha ha ha ha ha ha ha ha, said the clown to everyone there."
  assert tf.check(src, "Zählen: ha ha ha ha ha ha ha ha, sagte der Clown zu allen.", "de",
                  CFG) is None
  assert tf.loop_span("100000000 Dollar") is None  # digits only: not a loop


def test_script_fraction():
  assert tf.script_fraction("สวัสดีครับ", "th") == 1.0
  assert tf.script_fraction("Hello", "th") == 0.0
  assert tf.script_fraction("5 + 6 = 11.", "th") is None
  assert tf.script_fraction("Hallo", "de") is None


NATALIA = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
           "clips in May.")


def test_script_ratio_leaves_out_names_and_units_copied_from_the_source():
  out = "Natalia在四月份卖了48个发夹。"
  assert tf.script_fraction(out, "zh") == pytest.approx(9 / 16)  # 'Natalia' counts against
  assert tf.script_fraction(out, "zh", NATALIA) == 1.0
  assert tf.check(NATALIA, out, "zh", CFG) is None
  old = tf.FilterConfig(length_ratio=CFG.length_ratio, script_ignore_copied=False)
  assert tf.check(NATALIA, "Natalia在4月卖了48个clips给她的friends。", "zh", old) == "script"
  src = "Weng walks 3 km to the YMCA every day."
  assert tf.script_fraction("เวงเดิน 3 km ไป YMCA ทุกวัน", "th", src) == 1.0
  # A word not in the source still counts: it is untranslated, not copied.
  assert tf.script_fraction("Natalia在Juni卖了48个发夹。", "zh", NATALIA) == pytest.approx(6 / 10)


def test_copied_common_words_are_untranslated_english_not_names():
  """Measured on GSM8K -> zh: '他吃了 48 块 because 32 + 16 = 48' must stay a script drop."""
  assert tf.kept_words("If Weng walks 3 km to the YMCA, she earns 0.2 x 50 = $10. Then S + "
                       "2S.") == {"weng", "km", "ymca", "x", "s"}
  src = "He eats 48 pieces because 32 + 16 = 48"
  assert tf.check(src, "他吃了 48 块 because 32 + 16 = 48", "zh", CFG) == "script"
  src = "Weng earns 12/60 = $0.2 per minute."
  assert tf.check(src, "王恩 earns 12/60 = $0.2 per minute。", "zh", CFG) == "script"
  assert tf.check(src, "Weng 每分钟赚 12/60 = 0.2 美元。", "zh", CFG) is None


def test_untranslated_english_and_bare_names_still_fail_the_script_check():
  assert tf.check(SRC, "Roger有5个tennis balls. He buys 2 more cans.", "zh", CFG) == "script"
  # Only kept names, no Chinese at all: nothing was translated.
  assert tf.script_fraction("Natalia April May", "zh", NATALIA) == 0.0
  assert tf.check(NATALIA, "Natalia, April, May: 48", "zh", CFG) == "script"


NUM = tf.FilterConfig(length_ratio=CFG.length_ratio, numbers=True)


@pytest.mark.parametrize("source,output,reason", [
    (NATALIA, "Natalia在四月份卖了48个发夹，五月卖了一半。", None),
    (NATALIA, "Natalia在四月份卖了发夹给她的朋友，五月卖了一半。", "numbers"),
    ("Natalia sold 48/2 = 24 clips in May.", "Natalia在五月卖了48/2 = 24个发夹。", None),
    ("Natalia sold 48/2 = 24 clips in May.", "Natalia在五月卖了48/2 = 42个发夹。", "numbers"),
    ("The answer is 72.", "答案是 72。", None),  # short, still checked
    ("The answer is 72.", "答案是 27。", "numbers"),
    ("The answer is 1,200.", "答案是１２００。", None),
    ("It costs $1,200.50 in all.", "Insgesamt kostet es 1.200,50 $.", None),
    ("He has 12 sheep and 3 dogs.", "เขามีแกะ ๑๒ ตัวและสุนัข ๓ ตัว", None),
    ("On the 2nd day she ran 5 miles.", "第二天她跑了5英里。", None),  # ordinals may be words
    ("He has 12 sheep and 3 dogs.", "他有十二只羊和三只狗。", "numbers"),  # digits expected
])
def test_numbers_filter(source, output, reason):
  lang = "de" if "Insgesamt" in output else "th" if "เขา" in output else "zh"
  assert tf.check(source, output, lang, NUM) == reason
  assert tf.check(source, output, lang, CFG) is None  # off unless the task asks for it


def test_numbers_filter_skips_light_fields_and_reports_what_is_missing():
  assert tf.check("The answer is 72.", "答案", "zh", NUM, light=True) is None
  assert tf.missing_numbers("Buy 3 for $4.50, get 1,000 points", "买3个4.5美元，得1000分") == []
  assert tf.missing_numbers("Buy 3 for $4.50, get 1,000 points", "买3个，得1000分") == [4.5]


def test_filter_config_turns_numbers_on_for_math_only():
  from stt_jax import run_config, translate, translate_assemble  # pylint: disable=g-import-not-at-top
  cfg = run_config.get_config().translate
  assert translate.filter_config(cfg, "mgsm").numbers
  assert not translate.filter_config(cfg, "xnli").numbers
  assert not translate.filter_config(cfg).numbers
  assert translate.filter_config(cfg).script_ignore_copied


def test_assemble_drops_a_math_row_that_lost_a_number():
  from stt_jax import run_config, translate, translate_assemble  # pylint: disable=g-import-not-at-top
  from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
  cfg = run_config.get_config().translate
  cfg.codeswitch.enabled = False
  task = get_task("mgsm")
  row = task.load("train", limit=1)[0]
  plan = [{f: translate.split_field(t, cfg) for f, t in task.translatable_texts(row).items()}]
  good = {"Natalia sold clips to 48 of her friends in April, and then she sold half as many "
          "clips in May. How many clips did Natalia sell altogether in April and May?":
          "Natalia在四月份卖了48个发夹给她的朋友，五月卖了一半。她四月和五月一共卖了多少个发夹？",
          "Natalia sold 48/2 = 24 clips in May.": "Natalia在五月卖了48/2 = 24个发夹。",
          "Natalia sold 48+24 = 72 clips altogether in April and May.":
          "Natalia在四月和五月一共卖了48+24 = 72个发夹。",
          "The answer is 72.": "答案是 72。"}
  found = lambda texts: {s: {"src": s, "out": o, "ntok": 1, "budget": 64}
                         for s, o in texts.items()}
  assert set(good) == {s for p in plan[0].values() for line in p for s in line}
  result = translate_assemble.assemble(task, [row], plan, found(good), "zh", cfg)
  assert result.stats["kept"] == 1
  assert result.rows[0]["rationale"].endswith("答案是 72。")
  bad = {**good, "The answer is 72.": "答案是 27。"}
  result = translate_assemble.assemble(task, [row], plan, found(bad), "zh", cfg)
  assert result.stats["kept"] == 0 and result.stats["dropped"] == {"numbers": 1}
  cfg.filters.numbers_tasks = ()
  assert translate_assemble.assemble(task, [row], plan, found(bad), "zh", cfg).stats["kept"] == 1


def test_regex_sentences():
  text = ('Mr. Smith went to Washington in 1850. He said "Hi." Then J. S. Bach came! '
          'The U.S. Army won. Was it 5? 7 people came.')
  assert tf.regex_sentences(text) == [
      "Mr. Smith went to Washington in 1850.", 'He said "Hi."', "Then J. S. Bach came!",
      "The U.S. Army won.", "Was it 5?", "7 people came."]
  assert tf.split_sentences("One. Two.", "regex") == ["One.", "Two."]
  with pytest.raises(ValueError):
    tf.split_sentences("x", "nltk")


@pytest.mark.parametrize("answer,context,lang,method,span", [
    ("Denver Broncos", "Die Denver Broncos gewannen.", "de", "exact", "Denver Broncos"),
    ("denver broncos.", "Die Denver-Broncos gewannen.", "de", "normalised", "Denver-Broncos"),
    ("Denver Brancos", "Die Denver Broncos gewannen.", "de", "fuzzy", "Denver Broncos"),
    ("Bernadete Subirous", "Sie erschien Bernadette Soubirous 1858.", "de", "fuzzy",
     "Bernadette Soubirous"),
    ("丹佛野马队", "丹佛野马赢得了比赛。", "zh", "fuzzy", "丹佛野马"),
    ("ＮＦＬ", "Die NFL-Saison.", "de", "normalised", "NFL"),
])
def test_answer_alignment(answer, context, lang, method, span):
  found = tf.locate_answer(answer, context, lang)
  assert found.method == method
  assert context[found.start:found.end] == span


def test_answer_alignment_fails_and_prefers_the_expected_occurrence():
  assert tf.locate_answer("Paris", "Die Broncos gewannen das Spiel.", "de") is None
  assert tf.locate_answer("", "x", "de") is None
  ctx = "Bach lebte in Leipzig. Später starb Bach in Leipzig."
  assert tf.locate_answer("Leipzig", ctx, "de", expect=40).start == ctx.rindex("Leipzig")
  assert tf.locate_answer("Leipzig", ctx, "de", expect=0).start == ctx.index("Leipzig")


def test_codeswitch_patterns():
  fields = ["question", "rationale"]
  sides = codeswitch.parse_pattern("question=tgt, rationale=en", fields)
  assert sides == {"question": "tgt", "rationale": "en"}
  assert codeswitch.parse_pattern("rationale=tgt", fields) == {"question": "en",
                                                              "rationale": "tgt"}
  assert codeswitch.pattern_slug(sides, "de") == "cs-question_de-rationale_en"
  assert codeswitch.target_fields(sides) == ["question"]
  for bad in ("question=tgt,rationale=tgt", "question=de", "answer=tgt", "question"):
    with pytest.raises(ValueError):
      codeswitch.parse_pattern(bad, fields)
  for task, specs in codeswitch.DEFAULT_PATTERNS.items():
    from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top
    names = [f.name for f in get_task(task).translatable_fields]
    assert all(codeswitch.parse_pattern(s, names) for s in specs)
