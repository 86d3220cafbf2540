"""The self-translation stage: prompts, dedupe, resume after a crash, multi-host merge, and an
end-to-end run on a tiny random model.

Most tests replace `generation.generate_stream` with a fast fake "translator" that reverses every
word of the source (so SQuAD answers stay findable in the translated context) and records
which sources it was asked to decode.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from stt_jax import decode, generation, run_config, translate, translate_quality
from stt_jax.models import load_hf
from stt_jax.stages import translate as stage
from stt_jax.tasks import get_task
from tests import hf_tiny
from tests.test_decode import rigged

REPO = pathlib.Path(__file__).resolve().parents[1]


def fake_translation(source: str) -> str:
  return " ".join(w[::-1] for w in source.split())


def source_of(prompt: str) -> str:
  """The text of a prompt's query line ('English: <text>' before the open 'German:' line; the
  round-trip pass: 'German: <text>' before 'English:')."""
  return prompt.rsplit("\n", 2)[-2].split(": ", 1)[1]


class FakeDecoder:
  """Stands in for generation.generate_stream; `fail_after` batches raises (a crash)."""

  def __init__(self, fail_after: int | None = None, batch: int = 4):
    self.sources: list[str] = []
    self.fail_after, self.batch, self.batches = fail_after, batch, 0

  def __call__(self, model, tokenizer, prompts, details=False, **kwargs):
    del model, tokenizer, kwargs
    for k in range(0, len(prompts), self.batch):
      if self.fail_after is not None and self.batches >= self.fail_after:
        raise RuntimeError("simulated crash")
      self.batches += 1
      for i in range(k, min(k + self.batch, len(prompts))):
        self.sources.append(source_of(prompts[i]))
        text = " " + fake_translation(source_of(prompts[i]))
        yield i, (generation.Completion(text, len(text.split()) + 1, True) if details else text)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = hf_tiny.tmp_model(tmp_path_factory, "qwen2", max_position_embeddings=1024)
  model, _ = load_hf(folder)
  return model, hf_tiny.byte_tokenizer()


def small_config(limit=None, **overrides):
  """A run config (the stage reads `limit` English rows) with a small translate section."""
  cfg = run_config.get_config()
  cfg.task.train_limit = limit
  cfg.task.train_sample_seed = None  # The first `limit` rows.
  cfg.task.allow_subset = True
  t = cfg.translate
  t.shots, t.batch_size, t.progress, t.max_new_tokens = 2, 4, False, 4096
  t.model_id = "tiny"  # the same cache key in the subprocess test
  for k, v in overrides.items():
    setattr(t, k, v)
  return cfg


def read(workdir, name):
  return (pathlib.Path(workdir) / "translations" / name).read_text(encoding="utf-8")


def outputs(workdir, task, lang):
  return [read(workdir, f"{task}_{lang}.{kind}") for kind in ("train.jsonl", "cs.jsonl")]


# ------------------------------------------------------------------------------ prompts


def test_prompt_exact_string():
  cfg = run_config.get_config().translate
  pairs = [("Hello.", "Hallo."), ("Two cats.", "Zwei Katzen.")]
  assert translate.build_prompt(pairs, "A dog.", "de", cfg) == (
      "English: Hello.\nGerman: Hallo.\n\n"
      "English: Two cats.\nGerman: Zwei Katzen.\n\n"
      "English: A dog.\nGerman:")
  cfg.example_template = "<{src_name}> {text} <{tgt_name}> {translation}\n"
  cfg.query_template = "<{src_name}> {text} <{tgt_name}>"
  cfg.lang_names["th"] = "ภาษาไทย"
  assert translate.build_prompt(pairs[:1], "A dog.", "th", cfg) == (
      "<English> Hello. <ภาษาไทย> Hallo.\n<English> A dog. <ภาษาไทย>")


def test_exemplars_are_parallel_never_test_and_held_out_is_disjoint():
  cfg = run_config.get_config().translate
  math, rest = translate.exemplars("mgsm", "de", cfg)
  en_rows = get_task("mgsm").load("exemplars", "en")
  de_rows = get_task("mgsm").load("exemplars", "de")
  assert math == [(a["question"], b["question"]) for a, b in zip(en_rows, de_rows)]
  assert len(math) == 8 and rest == []
  chosen, heldout = translate.exemplars("xnli", "zh", cfg)
  again, _ = translate.exemplars("xnli", "de", cfg)
  assert len(chosen) == 8 and [en for en, _ in chosen] == [en for en, _ in again]
  assert not {en for en, _ in chosen} & {en for en, _ in heldout}
  dev_en = {" ".join(r[f].split()) for r in get_task("xnli").load("dev", "en") for f in ("premise", "hypothesis")}
  assert all(en in dev_en for en, _ in chosen + heldout[:50])
  assert all(en[0].isupper() and " uh " not in en for en, _ in chosen)
  cfg.exemplar_seed = 1
  assert translate.exemplars("xnli", "zh", cfg)[0] != chosen
  prompt = translate.build_prompt(chosen, "x", "zh", cfg)
  assert prompt.count("\nChinese: ") == 8 and prompt.endswith("English: x\nChinese:")


def test_prompt_id_changes_with_settings():
  cfg = run_config.get_config().translate
  pairs = [("a", "b")]
  base = translate.prompt_id(pairs, "de", cfg)
  assert base == translate.prompt_id(pairs, "de", cfg)
  assert base != translate.prompt_id(pairs, "ru", cfg)
  assert base != translate.prompt_id([("a", "c")], "de", cfg)
  cfg.query_template = "{src_name}: {text}\n{tgt_name}: "
  assert base != translate.prompt_id(pairs, "de", cfg)


def test_split_and_join_fields():
  cfg = run_config.get_config().translate
  cfg.split_sentences_over = 20
  parts = translate.split_field("Short line.\n\nA long line. It has two sentences.", cfg)
  assert parts == [["Short line."], [], ["A long line.", "It has two sentences."]]
  assert translate.join_field(parts, "de", cfg) == \
      "Short line.\n\nA long line. It has two sentences."
  assert translate.join_field([["一。", "二。"]], "zh", cfg) == "一。二。"
  cfg.split_sentences_over = -1
  assert translate.split_field("A long line. It has two sentences.", cfg) == \
      [["A long line. It has two sentences."]]


# ------------------------------------------------------------------------------ the stage


def test_dedupe_and_squad_alignment(tiny, tmp_path, monkeypatch):
  fake = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", fake)
  cfg = small_config(limit=8)
  stats = stage.translate_task(*tiny, "squad", "de", cfg, tmp_path)
  rows = get_task("xquad").load("train", "en", limit=8)
  segments = {s for r in rows for t in get_task("xquad").translatable_texts(r).values()
              for s in tf_segments(t, cfg)}
  to_decode = {s for s in segments if translate.needs_decoding(s)}
  assert sorted(fake.sources) == sorted(to_decode)  # every unique segment exactly once
  assert len({r["context"] for r in rows}) < len(rows)  # contexts really repeat
  assert stats["segments"]["decode"] == len(to_decode) == stats["throughput"]["decoded_segments"]
  assert stats["items"] == 8 and stats["kept"] == 8, stats
  # Reversed words move punctuation ('September 1876' -> 'rebmetpeS ,6781'): normalised match.
  assert stats["answer_alignment"] == {"exact": 5, "normalised": 3, "failed": 0}
  out = [json.loads(line) for line in read(tmp_path, "xquad_de.train.jsonl").splitlines()]
  for en, row in zip(rows, out):
    assert set(row) == set(en) and row["lang"] == "de" and row["id"] == en["id"] + ".de"
    answer = row["answers"][0]
    assert row["context"][answer["answer_start"]:].startswith(answer["text"])
    assert answer["text"].replace(",", "").replace(".", "") == \
        fake_translation(en["answers"][0]["text"]).replace(",", "").replace(".", "")
    assert row["question"] == fake_translation(en["question"])


def tf_segments(text, cfg):
  return [s for line in translate.split_field(text, cfg.translate) for s in line]


def test_codeswitched_rows(tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(translate.generation, "generate_stream", FakeDecoder())
  cfg = small_config(limit=3)
  cfg.translate.filters.numbers_tasks = ()  # The fake reverses numbers too ('16' -> '61').
  stats = stage.translate_task(*tiny, "mgsm", "de", cfg, tmp_path)
  cs = [json.loads(line) for line in read(tmp_path, "mgsm_de.cs.jsonl").splitlines()]
  en = get_task("mgsm").load("train", "en", limit=3)
  assert stats["codeswitched"] == len(cs) == 6
  by_id = {r["id"]: r for r in cs}
  for row in en:
    q_de = by_id[row["id"] + ".de.cs-question_de-rationale_en"]
    r_de = by_id[row["id"] + ".de.cs-question_en-rationale_de"]
    assert q_de["question"] == fake_translation(row["question"])
    assert q_de["rationale"] == row["rationale"]
    assert r_de["question"] == row["question"]
    assert r_de["rationale"].split("\n")[0] == fake_translation(row["rationale"].split("\n")[0])
    assert set(q_de) == set(row)
    assert get_task("mgsm").format_prompt(q_de).startswith("Question: ")


def test_squad_codeswitch_keeps_answer_with_its_context(tiny, tmp_path, monkeypatch):
  monkeypatch.setattr(translate.generation, "generate_stream", FakeDecoder())
  cfg = small_config(limit=2)
  stage.translate_task(*tiny, "xquad", "de", cfg, tmp_path)
  for line in read(tmp_path, "xquad_de.cs.jsonl").splitlines():
    row = json.loads(line)
    answer = row["answers"][0]
    assert row["context"][answer["answer_start"]:].startswith(answer["text"])


def test_filtered_examples_are_counted(tiny, tmp_path, monkeypatch):
  """Thai 'translations' in Latin script fail the script check; copies of short texts pass."""
  monkeypatch.setattr(translate.generation, "generate_stream", FakeDecoder())
  stats = stage.translate_task(*tiny, "xnli", "th", small_config(limit=5), tmp_path)
  assert stats["kept"] == 0 and stats["dropped"] == {"script": 5}
  assert stats["segments"]["rejected"]["script"] > 0
  assert read(tmp_path, "xnli_th.train.jsonl") == ""
  saved = json.loads(read(tmp_path, "xnli_th.stats.json"))
  assert saved["dropped"] == {"script": 5}


def test_resume_after_crash_and_torn_line(tiny, tmp_path, monkeypatch):
  cfg = small_config(limit=6)
  clean = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", clean)
  stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "clean")

  crash = FakeDecoder(fail_after=2)
  monkeypatch.setattr(translate.generation, "generate_stream", crash)
  with pytest.raises(RuntimeError, match="simulated crash"):
    stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  part = tmp_path / "run" / "translations" / "cache" / "xnli_de.part000.jsonl"
  done = [json.loads(line)["src"] for line in part.read_text().splitlines()]
  assert done == crash.sources and len(done) >= 4  # everything decoded is on disk
  with open(part, "a", encoding="utf-8") as f:  # a write torn by kill -9
    f.write('{"model": "x", "prompt": "y", "lang": "de", "src": "torn')
  assert not (tmp_path / "run" / "translations" / "xnli_de.train.jsonl").exists()

  resume = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", resume)
  stats = stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  assert not set(resume.sources) & set(done)
  assert sorted(resume.sources + done) == sorted(clean.sources)
  assert stats["segments"]["cached"] == len(done)
  assert outputs(tmp_path / "run", "xnli", "de") == outputs(tmp_path / "clean", "xnli", "de")
  assert all(json.loads(line) for line in part.read_text().splitlines())  # torn line gone

  again = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", again)
  stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  assert again.sources == []


def test_multi_host_slices_and_merge(tiny, tmp_path, monkeypatch):
  cfg = small_config(limit=6)
  single = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", single)
  stage.translate_task(*tiny, "mgsm", "zh", cfg, tmp_path / "one")
  hosts = []
  for index in (1, 0):  # process 0 last: it merges and writes
    hosts.append(FakeDecoder())
    monkeypatch.setattr(translate.generation, "generate_stream", hosts[-1])
    stats = stage.translate_task(*tiny, "mgsm", "zh", cfg, tmp_path / "two",
                                     process_index=index, process_count=2)
    written = (tmp_path / "two" / "translations" / "mgsm_zh.stats.json").exists()
    assert written == (index == 0)
  assert not set(hosts[0].sources) & set(hosts[1].sources)
  assert sorted(hosts[0].sources + hosts[1].sources) == sorted(single.sources)
  parts = sorted(p.name for p in (tmp_path / "two" / "translations" / "cache").iterdir())
  assert parts == ["mgsm_zh.part000.jsonl", "mgsm_zh.part001.jsonl"]
  assert outputs(tmp_path / "two", "mgsm", "zh") == outputs(tmp_path / "one", "mgsm", "zh")
  assert stats["hosts"] == 2


def test_two_real_jax_processes(tiny, tmp_path, monkeypatch):
  """jax.distributed with 2 CPU processes (gloo): each decodes its slice, the barrier holds
  process 1 until process 0 has written the files."""
  folder = tmp_path / "model"
  hf_tiny.make_tiny("qwen2", str(folder), max_position_embeddings=1024)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = textwrap.dedent(f"""
      import json, os, sys
      import jax
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2,
                                 process_id=int(sys.argv[1]))
      sys.path.insert(0, {str(REPO)!r})
      from stt_jax import sharding, translate
      from stt_jax.stages import translate as stage
      from stt_jax.models import load_hf
      from tests import hf_tiny, test_translate as t
      fake = t.FakeDecoder()
      translate.generation.generate_stream = fake
      mesh = sharding.make_mesh(devices=jax.local_devices())  # each host decodes alone
      model, _ = load_hf({str(folder)!r}, mesh=mesh)
      stats = stage.translate_task(model, hf_tiny.byte_tokenizer(), "xnli", "de",
                                       t.small_config(limit=6), {str(tmp_path / "two")!r},
                                       mesh=mesh)
      written = os.path.exists({str(tmp_path / "two" / "translations" / "xnli_de.cs.jsonl")!r})
      print("RESULT", json.dumps({{"sources": fake.sources, "kept": stats.get("kept"),
                                   "written": written}}))
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    results.append(json.loads(out.decode().split("RESULT ", 1)[1]))
  single = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", single)
  stats = stage.translate_task(*tiny, "xnli", "de", small_config(limit=6), tmp_path / "one")
  assert not set(results[0]["sources"]) & set(results[1]["sources"])
  assert sorted(results[0]["sources"] + results[1]["sources"]) == sorted(single.sources)
  assert results[0]["kept"] == stats["kept"] and results[1]["kept"] is None
  assert results[1]["written"]  # process 1 returned only after process 0 wrote
  assert outputs(tmp_path / "two", "xnli", "de") == outputs(tmp_path / "one", "xnli", "de")


def test_kill_9_mid_run_then_resume(tiny, tmp_path, monkeypatch):
  """A real SIGKILL of a subprocess while it writes the cache; the rerun finishes the job."""
  folder = tmp_path / "model"
  hf_tiny.make_tiny("qwen2", str(folder), max_position_embeddings=1024)
  script = textwrap.dedent(f"""
      import time, sys
      sys.path.insert(0, {str(REPO)!r})
      from stt_jax import translate
      from stt_jax.models import load_hf
      from stt_jax.stages import translate as stage
      from tests import hf_tiny, test_translate as t
      fake = t.FakeDecoder()
      def slow(*a, **k):
        for item in fake(*a, **k):
          time.sleep(0.05)
          yield item
      translate.generation.generate_stream = slow
      model, _ = load_hf({str(folder)!r})
      cfg = t.small_config(limit=30)
      stage.translate_task(model, hf_tiny.byte_tokenizer(), "xnli", "de", cfg,
                           {str(tmp_path / "run")!r})
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
                          stderr=subprocess.PIPE)
  part = tmp_path / "run" / "translations" / "cache" / "xnli_de.part000.jsonl"
  deadline = time.time() + 90
  while time.time() < deadline and proc.poll() is None:
    if part.exists() and part.read_text().count("\n") >= 8:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  lines = part.read_bytes().split(b"\n")
  done = [json.loads(x)["src"] for x in lines[:-1]]
  assert 8 <= len(done) < 60

  cfg = small_config(limit=30)
  resume = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", resume)
  stats = stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "run")
  assert not set(resume.sources) & set(done)
  clean = FakeDecoder()
  monkeypatch.setattr(translate.generation, "generate_stream", clean)
  stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path / "clean")
  assert sorted(resume.sources + done) == sorted(clean.sources)
  assert stats["segments"]["cached"] == len(done)
  assert outputs(tmp_path / "run", "xnli", "de") == outputs(tmp_path / "clean", "xnli", "de")


# ------------------------------------------------------------------------------ end to end


def test_end_to_end_tiny_model(tiny, tmp_path):
  """Real decoding with a random model: files, stats and schema (outputs are noise)."""
  cfg = small_config(limit=3, max_new_tokens=16)
  cfg.translate.filters.enabled = ()
  stats = stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path)
  en = get_task("xnli").load("train", "en", limit=3)
  rows = [json.loads(line) for line in read(tmp_path, "xnli_de.train.jsonl").splitlines()]
  assert stats["items"] == 3 and stats["kept"] == 3 and stats["dropped"] == {}
  assert [r["id"] for r in rows] == [r["id"] + ".de" for r in en]
  for e, r in zip(en, rows):
    assert set(r) == set(e) and r["lang"] == "de" and r["label"] == e["label"]
    assert get_task("xnli").format_target(r) == get_task("xnli").format_target(e)
    assert get_task("xnli").format_prompt(r).startswith("Premise: ")
  thr = stats["throughput"]
  assert thr["decoded_segments"] == stats["segments"]["decode"] > 0
  assert thr["decoded_tokens"] > 0 and thr["tokens_per_s"] > 0
  assert json.loads(read(tmp_path, "xnli_de.stats.json"))["kept"] == 3
  assert len(read(tmp_path, "xnli_de.cs.jsonl").splitlines()) == 6

  cfg.translate.filters.enabled = run_config.get_config().translate.filters.enabled
  refiltered = stage.translate_task(*tiny, "xnli", "de", cfg, tmp_path)
  assert refiltered["throughput"]["decoded_segments"] == 0  # all from the cache
  assert refiltered["kept"] + sum(refiltered["dropped"].values()) == 3


def test_quality_report_tiny_model(tiny):
  cfg = small_config(max_new_tokens=16)
  cfg.translate.quality.n = 4
  report = translate_quality.quality_report(*tiny, ["zh"], cfg.translate)
  zh = report["langs"]["zh"]
  assert zh["xnli_dev"]["n"] == 4 and zh["xnli_dev"]["bleu_tokenize"] == "zh"
  assert zh["mgsm_loo"]["n"] == 8
  assert 0 <= zh["xnli_dev"]["chrf"] <= 100
  assert report["throughput"]["decoded_segments"] == 12


def test_translation_scores():
  refs = ["Die Katze sitzt auf der Matte.", "Es regnet heute."]
  perfect = translate_quality.translation_scores(refs, refs, "de")
  assert perfect["chrf"] == 100 and perfect["bleu"] == 100 and perfect["bleu_tokenize"] == "13a"
  assert translate_quality.translation_scores(["你好"], ["你好吗"], "zh")["bleu_tokenize"] == "zh"
  assert translate_quality.translation_scores(["สวัสดี"], ["สวัสดี"], "th")["chrf"] == 100


@pytest.mark.parametrize("kind", hf_tiny.TOKENIZERS)
def test_segments_stop_at_newline_or_count_as_truncated(kind, tmp_path):
  """Real decoding with rigged models on both tokenizers: one always answers 'Hund.' and a
  newline (kept, ntok = its tokens), the other never writes a newline (every segment hits its
  budget: truncated, dropped, counted in the stats)."""
  tok = hf_tiny.tokenizer(kind)
  cfg = small_config(limit=2, max_new_tokens=16)
  answer = tok.encode("Hund.\n", add_special_tokens=False)
  for name, chain in (("stops", answer), ("runs_away", answer[:-1])):
    folder = rigged(kind, str(tmp_path / name), chain, max_position_embeddings=1024)
    model, _ = load_hf(folder)
    stats = stage.translate_task(model, tok, "xnli", "de", cfg, tmp_path / name)
    part = tmp_path / name / "translations" / "cache" / "xnli_de.part000.jsonl"
    records = [json.loads(line) for line in part.read_text().splitlines()]
    assert len(records) == stats["segments"]["decode"] > 0
    saved = json.loads(read(tmp_path / name, "xnli_de.stats.json"))
    if name == "stops":
      assert all(r["out"] == "Hund." and r["stopped"] and r["ntok"] == len(answer)
                 for r in records), records
      assert saved["segments"]["truncated"] == 0 and "truncated" not in saved["dropped"]
    else:
      assert all(not r["stopped"] and r["ntok"] == r["budget"] == 16 for r in records), records
      assert saved["segments"]["truncated"] == len(records)
      assert saved["dropped"] == {"truncated": 2} and saved["kept"] == 0


def test_is_truncated_uses_the_stop_flag_and_reads_old_caches():
  assert translate.is_truncated({"ntok": 3, "budget": 16, "stopped": False})
  assert not translate.is_truncated({"ntok": 16, "budget": 16, "stopped": True})
  assert translate.is_truncated({"ntok": 16, "budget": 16})  # before `stopped` existed
  assert not translate.is_truncated({"ntok": 15, "budget": 16})
