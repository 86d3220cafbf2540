"""Bad inputs end as one clear line from `python -m stt_jax.main`, before any stage starts.

Each case runs the real entry point on the tiny model (2 emulated devices), altered in one
way, and asserts: exit code != 0, the last stderr line starts with `error:`/`config:` and
names the key or file, no traceback, and nothing but config.json was written (no stage ran).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(workdir, model, *extra, config="configs/tiny.py", module="stt_jax.main"):
  """The entry point as users run it; returns the finished process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["PYTHONPATH"] = ROOT
  env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"  # Missing data: no network retries.
  cmd = [sys.executable, "-m", module, f"--config={config}", f"--workdir={workdir}",
         f"--config.model.path={model}", *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc, phrase, workdir=None):
  """Failed, with `phrase` in a last line that is the whole message, and no stage ran."""
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode != 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert lines and lines[-1].startswith(("error: ", "config: ")), proc.stderr[-3000:]
  assert phrase in lines[-1], lines[-1]
  assert len(lines[-1]) < 600, lines[-1]
  if workdir is not None and os.path.isdir(workdir):
    assert set(os.listdir(workdir)) <= {"config.json"}, os.listdir(workdir)
  assert "compiling" not in proc.stderr


def altered(model, dest, edit):
  """A copy of the model folder with `edit(folder)` applied."""
  folder = str(dest)
  shutil.copytree(model, folder)
  edit(folder)
  return folder


def edit_config(**changes):
  def edit(folder):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
      cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
      json.dump(cfg, f)
  return edit


def overwrite(name, data, offset=0):
  def edit(folder):
    with open(os.path.join(folder, name), "r+b") as f:
      f.seek(offset)
      f.write(data)
  return edit


def remove_tokenizer(folder):
  for name in os.listdir(folder):
    if name.startswith("tokenizer"):
      os.remove(os.path.join(folder, name))


# ------------------------------------------------------------------------------ config


def _config_file(tmp_path, line):
  path = tmp_path / "bad_config.py"
  path.write_text(f"from configs import tiny\n\n\ndef get_config():\n  c = tiny.get_config()\n"
                  f"  {line}\n  return c\n")
  return str(path)


def test_typo_in_config_file(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, config=_config_file(tmp_path, "c.train.lrr = 0.1"))
  assert_one_line_error(proc, "config: unknown key 'train.lrr'; did you mean 'train.lr'?",
                        workdir)


@pytest.mark.parametrize("override,phrase", [
    ("--config.train.steps=abc", "--config.train.steps=abc: invalid literal for int()"),
    ("--config.train.lr=fast", "--config.train.lr=fast: could not convert string to float"),
    ("--config.model.dtype=float8", "'model.dtype' = 'float8' is not one of float32"),
])
def test_wrong_type_override(tiny_model, tmp_path, override, phrase):
  workdir = str(tmp_path / "w")
  assert_one_line_error(run(workdir, tiny_model, override), phrase, workdir)


def test_wrong_type_in_config_file_is_one_line(tmp_path):
  """absl wraps the config file's traceback into the flag error; config_file_error keeps the
  file:line (naming the key) and the exception (cli.parse_flags prints it)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from stt_jax import cli  # pylint: disable=g-import-not-at-top
  path = _config_file(tmp_path, "c.train.lr = 'fast'")
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  sys.path.insert(0, ROOT)
  try:
    with pytest.raises(flags.Error) as e:
      fv(["prog", f"--config={path}"])
  finally:
    sys.path.remove(ROOT)
  line = cli.config_file_error(str(e.value))
  assert line.startswith(f"config: {path}:6: c.train.lr = 'fast': TypeError: "), line
  assert "'lr'" in line and "\n" not in line and "Traceback" not in line
  assert cli.config_file_error("flag --config.x=1: unknown") is None


def test_wrong_type_in_config_file_end_to_end(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  path = _config_file(tmp_path, "c.train.lr = 'fast'")
  proc = run(workdir, tiny_model, config=path)
  assert_one_line_error(proc, f"config: {path}:6: c.train.lr = 'fast': TypeError", workdir)


def test_mesh_that_does_not_divide_the_devices(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.mesh.fsdp=3")
  assert_one_line_error(proc, "mesh.data=1, mesh.fsdp=3, mesh.tensor=1: the product of the "
                        "fixed axes (3) must equal the 2 devices; set one axis to -1", workdir)


def test_batch_that_does_not_divide_the_mesh(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.train.batch_size=3")
  assert_one_line_error(proc, "train.batch_size=3 (micro-batch 3 with train.grad_accum=1) must "
                        "split evenly over the data-parallel size 2 (mesh.data=1 x mesh.fsdp=2)"
                        "; use a train.batch_size that is a multiple of 2", workdir)


def test_batch_and_mesh_checks_are_exact():
  """In-process: what passes and what fails, without a subprocess per case."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top

  def cfg(data, fsdp, tensor, batch, accum=1):
    return ml_collections.ConfigDict({
        "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
        "train": {"batch_size": batch, "grad_accum": accum}})

  assert preflight.check_mesh(cfg(1, -1, 1, 8), 8) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert preflight.check_mesh(cfg(2, -1, 2, 8), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  for bad in (cfg(1, 3, 1, 8), cfg(3, -1, 1, 8), cfg(-1, -1, 1, 8), cfg(0, -1, 1, 8),
              cfg(2, 2, 1, 8)):
    with pytest.raises(preflight.PreflightError, match="mesh.data="):
      preflight.check_mesh(bad, 8)
  preflight.check_batch(cfg(2, 2, 2, 16, 4), {"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(preflight.PreflightError, match="multiple of 16"):
    preflight.check_batch(cfg(2, 2, 2, 8, 4), {"data": 2, "fsdp": 2, "tensor": 2})
  with pytest.raises(preflight.PreflightError, match="multiple of train.grad_accum=3"):
    preflight.check_batch(cfg(1, 1, 1, 8, 3), {"data": 1, "fsdp": 1, "tensor": 1})


# ------------------------------------------------------------------------------ model folder


def test_missing_model_folder(tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, str(tmp_path / "no_such_model"))
  assert_one_line_error(proc, f"model.path={str(tmp_path / 'no_such_model')!r} is not a Hugging "
                        "Face model folder (no config.json)")


@pytest.mark.parametrize("name,edit,phrase", [
    ("arch", edit_config(architectures=["GPT2LMHeadModel"]),
     "config.json: unsupported architecture ['GPT2LMHeadModel'] (key 'architectures'); "
     "supported: LlamaForCausalLM"),
    ("vocab", edit_config(vocab_size=200),
     "the tokenizer has 256 tokens but config.json says vocab_size=200; the tokenizer files "
     "belong to another model"),
    ("vocab_big", edit_config(vocab_size=4096),
     "the tokenizer has only 256 tokens but config.json says vocab_size=4096"),
    ("header", overwrite("model.safetensors", b"\xff" * 8),
     "model.safetensors: corrupt safetensors header (declared length"),
    ("header_json", overwrite("model.safetensors", b"}{", offset=8),
     "model.safetensors: corrupt safetensors header ("),
    ("truncated", lambda d: os.truncate(os.path.join(d, "model.safetensors"), 4000),
     "model.safetensors: tensor"),
    ("no_tokenizer", remove_tokenizer, "no tokenizer files (tokenizer.json, tokenizer.model"),
    ("bad_tokenizer", overwrite("tokenizer.json", b'{"broken'),
     "the tokenizer cannot be loaded ("),
])
def test_broken_model_folder(tiny_model, tmp_path, name, edit, phrase):
  folder = altered(tiny_model, tmp_path / name, edit)
  workdir = str(tmp_path / "w")
  assert_one_line_error(run(workdir, folder), phrase, workdir)


# ------------------------------------------------------------------------------ data


def _data_dir(tmp_path, rel, edit):
  """A task.data_dir holding only `rel` (copied from the bundled data/), edited."""
  from stt_jax.tasks import DATA_DIR  # pylint: disable=g-import-not-at-top
  path = tmp_path / "data" / rel
  path.parent.mkdir(parents=True)
  lines = (DATA_DIR / rel).read_text(encoding="utf-8").splitlines(keepends=True)
  path.write_text("".join(edit(lines)), encoding="utf-8")
  return str(tmp_path / "data"), str(path)


def test_jsonl_with_a_broken_line(tiny_model, tmp_path):
  data_dir, path = _data_dir(tmp_path, "mnli/train.jsonl",
                             lambda lines: lines[:6] + ['{"premise": "cut off\n'] + lines[6:])
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, f"--config.task.data_dir={data_dir}")
  assert_one_line_error(proc, f"error: data: {path}:7: broken JSON", workdir)
  assert "fix or delete the line" in proc.stderr


def test_language_the_task_has_no_data_for(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.task.target_langs=('xx',)")
  assert_one_line_error(proc, "task.target_langs has 'xx' but there is no xnli 'dev' [xx] data "
                        "(languages with xnli 'dev' data: de, en, ru, th, zh)", workdir)


def test_eval_language_without_data_in_the_eval_loop(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.eval.langs=('en','xx')", module="stt_jax.evaluate")
  assert_one_line_error(proc, "eval.langs has 'xx' but there is no xnli 'test' [xx] data "
                        "(languages with xnli 'test' data: de, en, ru, th, zh)", workdir)


def test_eval_prompts_longer_than_the_model_context(tiny_model, tmp_path):
  """The tiny model has 1024 positions: a Chinese MGSM question in byte tokens plus a
  1000-token answer budget does not fit."""
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.task.name=mgsm", "--config.eval.method=generate",
             "--config.eval.max_new_tokens=1000", "--config.eval.langs=('zh',)",
             "--config.variants=('zero_shot',)")
  assert_one_line_error(proc, "mgsm test prompts in 'zh' do not fit the model's 1024 positions "
                        "with eval.max_new_tokens=1000", workdir)


def test_emptied_data_file(tiny_model, tmp_path):
  data_dir, path = _data_dir(tmp_path, "xnli/xnli_test_zh.jsonl", lambda lines: [])
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, f"--config.task.data_dir={data_dir}")
  assert_one_line_error(proc, f"eval.langs has 'zh' but xnli 'test' [zh] is empty ({path}: the "
                        "file has no rows)", workdir)


def test_file_of_malformed_rows(tiny_model, tmp_path):
  data_dir, path = _data_dir(tmp_path, "xnli/xnli_test_zh.jsonl",
                             lambda lines: ['{"premise": "p", "hypothesis": "h"}\n'] * 3)
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, f"--config.task.data_dir={data_dir}")
  assert_one_line_error(proc, f"is empty ({path}: all 3 rows are malformed, e.g. {path}:1: "
                        "missing field 'label')", workdir)


def test_too_few_exemplars(tiny_model, tmp_path):
  workdir = str(tmp_path / "w")
  proc = run(workdir, tiny_model, "--config.translate.shots=100000")
  assert_one_line_error(proc, "translate.shots=100000 but the xnli exemplar pool for 'zh' has",
                        workdir)


def test_sharded_folder_checked_shard_by_shard(tiny_model, tmp_path):
  """Every shard's header is read before any stage (not only the first file a load touches)."""
  from stt_jax import preflight  # pylint: disable=g-import-not-at-top
  from stt_jax.models import LoadError, load_hf, save_hf  # pylint: disable=g-import-not-at-top
  from stt_jax.models.safetensors_io import SafetensorsError  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path / "sharded")
  save_hf(*load_hf(tiny_model), folder, tokenizer_dir=tiny_model, max_shard_bytes=100_000)
  with open(os.path.join(folder, "model.safetensors.index.json")) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  assert len(shards) > 2
  preflight.load_tokenizer(folder)
  overwrite(shards[-1], b"\xff" * 8)(folder)
  with pytest.raises(SafetensorsError, match=f"{shards[-1]}: corrupt safetensors header"):
    preflight.load_tokenizer(folder)
  os.remove(os.path.join(folder, shards[-1]))
  with pytest.raises(LoadError, match=f"{shards[-1]}: listed in model.safetensors.index.json"):
    preflight.load_tokenizer(folder)
