"""Training data: target-only masks, packing, resumable iterator, mixture weights."""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest

from stt_jax import decode, loss, train_data
from stt_jax.models import load_hf
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_train_helpers import ByteTokenizer, math_rows

TASK = get_task("mgsm")


def _iterator(examples, **kw):
  args = dict(batch_size=4, seq_len=64, packing=True, weights={}, seed=0)
  args.update(kw)
  return train_data.BatchIterator(examples, **args)


def test_masks_cover_only_target_tokens_hf_tokenizer():
  tok = hf_tiny.byte_tokenizer()
  rows = TASK.load("train", "en", limit=6)
  examples = train_data.tokenize(TASK, {"en": rows}, tok, seq_len=1024)
  assert examples.truncated == examples.dropped == 0
  for packing in (False, True):
    it = _iterator(examples, batch_size=6, seq_len=1024, packing=packing)
    batch = it.next()
    seen = []
    for r in range(batch.inputs.shape[0]):
      for seg in np.unique(batch.segment_ids[r][batch.segment_ids[r] > 0]):
        where = batch.segment_ids[r] == seg
        mask = batch.loss_mask[r][where].astype(bool)
        prompt = tok.decode(batch.inputs[r][where][:1 + np.argmax(mask)])
        target = batch.targets[r][where][mask]
        assert target[-1] == tok.eos_token_id
        assert np.all(mask[np.argmax(mask):]), "the mask is one contiguous target span"
        seen.append((prompt, tok.decode(target[:-1])))
        assert batch.positions[r][where][0] == 0
    expected = sorted((TASK.format_prompt(x), TASK.format_target(x)) for x in rows)
    assert sorted(seen) == expected
    # Padding carries no loss and no segment.
    assert not np.any(batch.loss_mask[batch.segment_ids == 0])


def test_truncation_and_drop_counts_per_source_and_language():
  rows = math_rows(3)
  rows[1] = dict(rows[1], rationale="x" * 200)
  rows[2] = dict(rows[2], question="y" * 100)
  de = math_rows(4, "de", 1)
  de[0] = dict(de[0], rationale="z" * 200)
  examples = train_data.tokenize(TASK, {"en": rows, "translated": de}, ByteTokenizer(),
                                 seq_len=64)
  assert (examples.truncated, examples.dropped, len(examples.tokens)) == (2, 1, 6)
  assert max(len(t) for t in examples.tokens) == 65
  assert examples.cut == {"en": {"en": {"truncated": 1, "dropped": 1, "of": 3}},
                          "translated": {"de": {"truncated": 1, "dropped": 0, "of": 4}}}


class _PairTask:
  """A task whose prompt and target are fields of the row (boundary cases by hand)."""

  def format_prompt(self, row):
    return row["prompt"]

  def format_target(self, row):
    return row["target"]


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
def test_ids_are_the_joined_text_and_the_mask_its_target(kind):
  """Ids equal tokenizer(prompt + target), as generation sees the text; prompt and target
  encoded apart would put an extra dummy-prefix '▁' before a target after a newline (sp)."""
  tok = hf_tiny.tokenizer(kind)
  rows = TASK.load("train", "en", limit=4)
  pairs = [{"prompt": TASK.format_prompt(r), "target": TASK.format_target(r), "lang": "en"}
           for r in rows]
  pairs += [{"prompt": "Question: 2 plus 40?\nAnswer:\n", "target": "42", "lang": "en"},
            {"prompt": "Premise: a dog.\nLabel:", "target": " entailment", "lang": "en"}]
  examples = train_data.tokenize(_PairTask(), {"en": pairs}, tok, seq_len=1024)
  for ids, n_prompt, pair in zip(examples.tokens, examples.prompt_len, pairs):
    joined = tok(pair["prompt"] + pair["target"])["input_ids"]
    assert list(ids) == list(joined) + [tok.eos_token_id]
    prompt = tok(pair["prompt"])["input_ids"]
    assert n_prompt == len(prompt) and list(ids[:n_prompt]) == list(prompt)
    text = tok.decode(ids[:-1], skip_special_tokens=True)
    assert text.endswith(pair["target"])
    assert tok.decode(ids[n_prompt:-1], skip_special_tokens=True).strip() == \
        pair["target"].strip()
  it = _iterator(examples, batch_size=len(pairs), seq_len=1024, packing=False)
  batch = it.next()
  for r, i in enumerate(it.rows(0)[:len(pairs)]):
    i = i[0]
    want = examples.tokens[i][examples.prompt_len[i]:]
    np.testing.assert_array_equal(batch.targets[r][batch.loss_mask[r].astype(bool)], want)


def test_a_token_across_the_boundary_belongs_to_the_target():
  tok = hf_tiny.sp_tokenizer()
  pair = {"prompt": "Premise: a dog.\nLabel: ent", "target": "ailment", "lang": "en"}
  (ids, n_prompt), = train_data.joined_tokens(tok, [pair["prompt"]], [pair["target"]])
  assert tok.convert_ids_to_tokens(ids[n_prompt:]) == ["▁entailment"]
  assert n_prompt == len(tok(pair["prompt"])["input_ids"]) - 1
  examples = train_data.tokenize(_PairTask(), {"en": [pair]}, tok, seq_len=64)
  assert list(examples.tokens[0]) == ids + [tok.eos_token_id]
  assert examples.prompt_len[0] == n_prompt


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
@pytest.mark.parametrize("name", ["mgsm", "xquad", "xnli"])
def test_generating_the_training_target_scores_full_marks(name, kind):
  """What training teaches is what eval extracts: the target tokens (after the joined text's
  prompt tokens), decoded and trimmed as generation.generate_stream does, score 100% on each
  tokenizer (sp: no leading '▁' space in a lone decode, '\\n' a byte piece, Thai and Chinese
  byte fallback)."""
  tok = hf_tiny.tokenizer(kind)
  task = get_task(name)
  for split, lang in (("train", "en"), ("test", "th"), ("test", "zh")):
    rows = task.load(split, lang, limit=6)
    pairs = train_data.joined_tokens(tok, [task.format_prompt(r) for r in rows],
                                     [task.format_target(r) for r in rows])
    for row, (ids, n_prompt) in zip(rows, pairs):
      text = decode.trim_text(tok.decode(ids[n_prompt:], skip_special_tokens=True,
                                         clean_up_tokenization_spaces=False),
                              task.stop_sequences)
      scores = task.example_scores(text, row)
      full = {m: 100.0 if name == "xquad" else 1.0 for m in task.metric_names}
      assert scores == full, (lang, text[:80], task.format_target(row)[:80])


def test_packed_loss_equals_unpacked_loss(tmp_path):
  folder = hf_tiny.make_tiny("llama_gqa", str(tmp_path / "m"))
  model, _ = load_hf(folder)
  examples = train_data.tokenize(TASK, {"en": math_rows(10)}, ByteTokenizer(), seq_len=128)
  packed = _iterator(examples, batch_size=10, seq_len=128, packing=True).next()
  single = _iterator(examples, batch_size=10, seq_len=128, packing=False).next()
  assert packed.segment_ids.max() > 1, "several examples share a row"
  assert int(np.sum(packed.segment_ids[:, 0] > 0)) < 10
  sums = [loss.token_loss_sum(model, {k: jnp.asarray(v) for k, v in b.arrays().items()})
          for b in (packed, single)]
  (loss_p, n_p), (loss_u, n_u) = [(float(a), float(b)) for a, b in sums]
  assert n_p == n_u > 0
  np.testing.assert_allclose(loss_p, loss_u, rtol=1e-5)


def test_iterator_resumes_at_same_position():
  examples = train_data.tokenize(TASK, {"en": math_rows(30)}, ByteTokenizer(), seq_len=64)
  it = _iterator(examples, seed=3)
  per_epoch = it.batches_in_epoch(0)
  for _ in range(per_epoch + 1):  # Into the second epoch.
    it.next()
  state = dict(it.state)
  assert state == {"seed": 3, "epoch": 1, "position": 1}
  expected = [it.next() for _ in range(per_epoch)]
  resumed = _iterator(examples, seed=3, state=json.loads(json.dumps(state)))
  for want in expected:
    got = resumed.next()
    for name, value in want.arrays().items():
      np.testing.assert_array_equal(getattr(got, name), value)
  with pytest.raises(train_data.DataError, match="seed"):
    _iterator(examples, seed=4, state=state)


def test_epochs_differ_and_cover_every_row():
  examples = train_data.tokenize(TASK, {"en": math_rows(30)}, ByteTokenizer(), seq_len=64)
  orders = [train_data.epoch_order(examples, {}, seed=0, epoch=e) for e in range(2)]
  assert sorted(orders[0]) == sorted(orders[1]) == list(range(30))
  assert list(orders[0]) != list(orders[1])
  assert list(orders[0]) == list(train_data.epoch_order(examples, {}, seed=0, epoch=0))


def test_mixture_proportions_honour_the_weights():
  tok = ByteTokenizer()
  rows = {"en": math_rows(100), "translated": math_rows(80, "de", 1),
          "code_switched": math_rows(50, "de", 2)}
  examples = train_data.tokenize(TASK, rows, tok, seq_len=64)
  weights = {"en": 1.0, "translated": 0.5, "code_switched": 2.0}
  seen = collections.Counter()
  for epoch in range(2):
    order = train_data.epoch_order(examples, weights, seed=0, epoch=epoch)
    counts = collections.Counter(examples.sources[examples.source[i]] for i in order)
    assert counts == {"en": 100, "translated": 40, "code_switched": 100}
    seen.update(int(i) for i in order)
  de = examples.indices("translated")
  cs = examples.indices("code_switched")
  # Weight 0.5: two epochs use every translated row exactly once; weight 2: twice per epoch.
  assert all(seen[int(i)] == 1 for i in de)
  assert all(seen[int(i)] == 4 for i in cs)
  # Weight 0 leaves a source out.
  order = train_data.epoch_order(examples, {"translated": 0.0}, seed=0, epoch=0)
  assert not set(de) & set(order.tolist())


def test_local_rows_are_the_global_batch_rows():
  examples = train_data.tokenize(TASK, {"en": math_rows(40)}, ByteTokenizer(), seq_len=64)
  full = _iterator(examples, batch_size=8).next()
  part = _iterator(examples, batch_size=8).next(rows=[2, 3, 6, 7])
  np.testing.assert_array_equal(part.inputs, full.inputs[[2, 3, 6, 7]])
  np.testing.assert_array_equal(part.loss_mask, full.loss_mask[[2, 3, 6, 7]])


def test_variants_and_row_files(tmp_path):
  rows = {"en": math_rows(2), "translated": math_rows(2, "de")}
  assert list(train_data.rows_for_variant("zero_shot", rows)) == ["en"]
  assert list(train_data.rows_for_variant("self_translate", rows)) == ["en", "translated"]
  with pytest.raises(train_data.DataError, match="code_switched"):
    train_data.rows_for_variant("self_translate_cs", rows)
  with pytest.raises(train_data.DataError, match="unknown variant"):
    train_data.rows_for_variant("self-translate", rows)
  path = tmp_path / "mgsm_de.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows["translated"]) + "\n")
  assert train_data.read_rows(path) == rows["translated"]
  path.write_text('{"id": 1}\n{broken\n')
  with pytest.raises(train_data.DataError, match=r"mgsm_de.jsonl:2"):
    train_data.read_rows(path)
  with pytest.raises(train_data.DataError, match="unknown data source"):
    train_data.tokenize(TASK, {"english": rows["en"]}, ByteTokenizer(), 64)
