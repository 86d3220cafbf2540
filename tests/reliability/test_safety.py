"""Model folders are read as data, never executed, and configs cannot write outside the workdir.

Each hostile input carries a payload that would create a sentinel file if it ever ran; the
payloads are shown to be live (run on purpose into a control sentinel) so the tests can fail.
"""

import ast
import json
import logging
import os
import pathlib
import pickle
import shutil

import pytest

from tests.reliability.test_bad_inputs import ROOT, assert_one_line_error, run

_CODE = "import pathlib\npathlib.Path({sentinel!r}).write_text('code from the model folder ran')\n"


def _with_code(model, folder, sentinel, where):
  """A copy of the model whose `where` json asks transformers to import custom.py."""
  shutil.copytree(model, folder)
  (folder / "custom.py").write_text(
      _CODE.format(sentinel=str(sentinel)) +
      "from transformers import PreTrainedTokenizerFast\n\n\n"
      "class CustomTokenizer(PreTrainedTokenizerFast):\n  pass\n")
  path = folder / where
  cfg = json.loads(path.read_text())
  cfg["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None],
                     "AutoModelForCausalLM": "custom.CustomModel"}
  if where == "tokenizer_config.json":
    cfg["tokenizer_class"] = "CustomTokenizer"
  path.write_text(json.dumps(cfg))
  return str(folder)


def test_custom_code_payload_is_live(tmp_path):
  control = tmp_path / "control"
  code = compile(_CODE.format(sentinel=str(control)), "custom.py", "exec")
  exec(code, {})  # pylint: disable=exec-used
  assert control.is_file()


@pytest.mark.parametrize("where", ["tokenizer_config.json", "config.json"])
def test_auto_map_code_is_never_imported(tiny_model, tmp_path, caplog, where):
  """Decision: the folder's plain tokenizer files (tokenizer.json: data) are loaded and the
  custom class is ignored, with a warning; transformers does the same with
  trust_remote_code=False. The weights load with our own decoder, never the folder's."""
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  sentinel = tmp_path / "SENTINEL"
  folder = _with_code(tiny_model, tmp_path / "model", sentinel, where)
  with caplog.at_level(logging.WARNING):
    tok = preflight.load_tokenizer(folder)
  model, _ = load_hf(folder)
  assert not sentinel.exists()
  assert type(tok).__name__ != "CustomTokenizer"
  assert tok.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]
  assert model.config.vocab_size == 256
  if where == "tokenizer_config.json":
    assert "custom tokenizer code" in caplog.text and "never run" in caplog.text


def test_auto_map_without_plain_tokenizer_files_is_an_error(tiny_model, tmp_path):
  sentinel = tmp_path / "SENTINEL"
  folder = _with_code(tiny_model, tmp_path / "model", sentinel, "tokenizer_config.json")
  os.remove(os.path.join(folder, "tokenizer.json"))
  workdir = str(tmp_path / "w")
  assert_one_line_error(run(workdir, folder), "no tokenizer files (tokenizer.json", workdir)
  assert not sentinel.exists()


class _Payload:
  """Unpickling this touches `path`: what a malicious pytorch_model.bin does."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def __reduce__(self):
    return (pathlib.Path.touch, (self.path,))


def test_pickle_payload_is_live(tmp_path):
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(_Payload(control)))  # The one deliberate unpickle: proves the bytes.
  assert control.is_file()


def test_pickle_only_model_is_never_unpickled(tiny_model, tmp_path):
  sentinel = tmp_path / "SENTINEL"
  folder = tmp_path / "model"
  shutil.copytree(tiny_model, folder)
  os.remove(folder / "model.safetensors")
  (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(sentinel)))
  workdir = str(tmp_path / "w")
  proc = run(workdir, str(folder))
  assert_one_line_error(proc, "only pickle weights (pytorch_model.bin) found; they are never "
                        "unpickled here", workdir)
  assert not sentinel.exists()


def test_pickle_beside_safetensors_is_ignored(tiny_model, tmp_path):
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
  sentinel = tmp_path / "SENTINEL"
  folder = tmp_path / "model"
  shutil.copytree(tiny_model, folder)
  for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
    (folder / name).write_bytes(pickle.dumps(_Payload(sentinel)))
  preflight.load_tokenizer(str(folder))
  load_hf(str(folder))
  assert not sentinel.exists()


# ------------------------------------------------------------------------------ paths


def _tree(root):
  """Every folder (with a trailing '/') and file under root, relative to it."""
  out = []
  for d, _, files in os.walk(root):
    rel = os.path.relpath(d, root)
    out += [rel + "/"] + [os.path.join(rel, f) for f in files]
  return sorted(out)


@pytest.mark.parametrize("override,phrase", [
    ("--config.task.target_langs=('../../../../escape',)",
     "config: task.target_langs has '../../../../escape', which is not a plain name"),
    ("--config.task.target_langs=('zh/../../../escape',)", "config: task.target_langs has"),
    ("--config.eval.langs=('en','../../../escape')", "config: eval.langs has '../../../escape'"),
    ("--config.eval.langs=('/tmp/escape',)", "config: eval.langs has '/tmp/escape'"),
    ("--config.translate.src_lang=../../escape", "config: translate.src_lang has"),
    ("--config.variants=('../../escape',)", "config: 'variants' = '../../escape' is not one of"),
])
def test_config_values_cannot_write_outside_the_workdir(tiny_model, tmp_path, override, phrase):
  outer = tmp_path / "outer"
  workdir = outer / "a" / "b" / "w"
  workdir.parent.mkdir(parents=True)
  before = _tree(outer)
  proc = run(str(workdir), tiny_model, override)
  assert_one_line_error(proc, phrase, str(workdir))
  inside = os.path.join("a", "b", "w") + os.sep
  after = [f for f in _tree(outer) if not f.startswith(inside)]
  assert after == before
  assert not os.path.exists("/tmp/escape")


def test_plain_names():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax import run_config  # pylint: disable=g-import-not-at-top
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  cfg = run_config.get_config()
  cfg.task.target_langs = ("de", "zh-CN", "pt_BR", "sr.latn")
  preflight.check_names(cfg)
  for bad in ("..", "a/b", "", "/abs", ".hidden", "a\\b", "x..y", "zh\n", "-rf"):
    cfg = ml_collections.ConfigDict(run_config.get_config().to_dict())
    cfg.eval.langs = ("en", bad)
    with pytest.raises(preflight.PreflightError, match="config: eval.langs has"):
      preflight.check_names(cfg)


# ------------------------------------------------------------------------------ source scan


_UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                   "torch"}


def _sources():
  for path in sorted(pathlib.Path(ROOT, "stt_jax").rglob("*.py")):
    yield path, ast.parse(path.read_text(encoding="utf-8"), str(path))


def test_package_never_unpickles_or_runs_model_code():
  """No pickle/torch imports, no torch.load/pickle.load, no trust_remote_code other than a
  literal False, no allow_pickle=True, no eval/exec in stt_jax/."""
  problems = []
  for path, tree in _sources():
    rel = path.relative_to(ROOT)
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        names = [a.name.split(".")[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [(node.module or "").split(".")[0]]
      else:
        names = []
      problems += [f"{rel}:{node.lineno}: imports {n}" for n in names if n in _UNSAFE_MODULES]
      if not isinstance(node, ast.Call):
        continue
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
      owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
      if name in ("eval", "exec") and not owner:
        problems.append(f"{rel}:{node.lineno}: calls {name}()")
      if owner in ("pickle", "torch") and name in ("load", "loads"):
        problems.append(f"{rel}:{node.lineno}: calls {owner}.{name}()")
      for kw in node.keywords:
        if kw.arg == "trust_remote_code" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False):
          problems.append(f"{rel}:{node.lineno}: trust_remote_code is not a literal False")
        if kw.arg == "allow_pickle" and not (
            isinstance(kw.value, ast.Constant) and kw.value.value is False):
          problems.append(f"{rel}:{node.lineno}: allow_pickle is not a literal False")
  assert not problems, "\n".join(problems)


def test_source_scan_catches_what_it_looks_for(tmp_path, monkeypatch):
  """The scan above on a planted file: it must report every kind of problem it checks."""
  pkg = tmp_path / "stt_jax"
  pkg.mkdir()
  (pkg / "bad.py").write_text(
      "import pickle\nimport torch.nn\nfrom dill import loads\nimport numpy as np\n"
      "pickle.load(f)\ntorch.load(p)\nAutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
      "np.load(p, allow_pickle=True)\neval('1')\n")
  monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", str(tmp_path))
  with pytest.raises(AssertionError) as e:
    test_package_never_unpickles_or_runs_model_code()
  text = str(e.value)
  for want in ("imports pickle", "imports torch", "imports dill", "calls pickle.load()",
               "calls torch.load()", "trust_remote_code is not", "allow_pickle is not",
               "calls eval()"):
    assert want in text, (want, text)
