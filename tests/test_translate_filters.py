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
