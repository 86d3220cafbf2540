"""launch/tpu_vm.sh --dry-run prints the exact gcloud command lines (no gcloud on PATH), and
each one reads back, through a shell's quoting, as the intended argv."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_vm.sh")
BASH = shutil.which("bash")
ENV = {"TPU": "stt-v4-8", "ZONE": "us-central2-b", "TYPE": "v4-8", "HOME": "/nonexistent"}
pytestmark = pytest.mark.skipif(BASH is None, reason="bash not installed")


@pytest.fixture(scope="module")
def bin_dir(tmp_path_factory):
  """A PATH with bash and dirname only: no gcloud."""
  path = tmp_path_factory.mktemp("bin")
  for tool in ("bash", "dirname"):
    os.symlink(shutil.which(tool), path / tool)
  return str(path)


@pytest.fixture
def dry(bin_dir):
  def run(*args, **env) -> list[list[str]]:
    """argv of each command the script prints."""
    out = subprocess.run([BASH, SCRIPT, *args], env={**ENV, "PATH": bin_dir, **env},
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return [shlex.split(line) for line in out.splitlines()]
  return run


SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "stt-v4-8", "--zone", "us-central2-b",
       "--worker=all", "--command"]


def test_create_prints_the_gcloud_create_command(dry, bin_dir):
  assert shutil.which("gcloud", path=bin_dir) is None
  want = [["gcloud", "compute", "tpus", "tpu-vm", "create", "stt-v4-8", "--zone",
           "us-central2-b", "--accelerator-type", "v4-8", "--version", "tpu-ubuntu2204-base"]]
  assert dry("create", "--dry-run") == want
  assert dry("--dry-run", "create") == want
  assert dry("create", DRY_RUN="1") == want


def test_install_prints_copy_then_setup_on_every_worker(dry):
  scp, ssh = dry("install", "--dry-run")
  assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--zone", "us-central2-b",
                 "--worker=all", "--recurse", os.path.join(ROOT, "launch", ".."),
                 "stt-v4-8:~/stt_jax"]
  assert ssh[:-1] == SSH
  remote = ssh[-1]
  assert remote.startswith("cd ~/stt_jax && python3 -m venv .venv")
  assert "pip install -q -r requirements.txt" in remote
  assert shlex.split(remote)[-1] == "jax[tpu]"


def test_run_and_eval_quote_every_argument_for_the_remote_shell(dry):
  variants = "--config.variants=('zero_shot',)"
  (ssh,) = dry("run", "--dry-run", "configs/mgsm_th.py", "/mnt/w", "--config.model.path=/m",
               variants)
  assert ssh[:-1] == SSH
  remote = shlex.split(ssh[-1])  # What the worker's shell will run.
  assert remote[remote.index("python"):] == [
      "python", "-m", "stt_jax.main", "--config=configs/mgsm_th.py", "--workdir=/mnt/w",
      "--config.model.path=/m", variants]
  (ssh,) = dry("eval", "configs/xnli_de.py", "/w", DRY_RUN="1")
  assert shlex.split(ssh[-1])[-3:] == ["stt_jax.evaluate", "--config=configs/xnli_de.py",
                                       "--workdir=/w"]


def test_without_dry_run_it_runs_gcloud(tmp_path, bin_dir):
  """Today's behaviour: the same arguments go to gcloud itself (a stub here)."""
  stub = tmp_path / "gcloud"
  stub.write_text(f'#!{BASH}\nprintf "%s\\n" "$@" > "$GCLOUD_ARGS"\n')
  stub.chmod(0o755)
  log = tmp_path / "args"
  env = {**ENV, "PATH": f"{tmp_path}:{bin_dir}", "GCLOUD_ARGS": str(log)}
  subprocess.run([BASH, SCRIPT, "delete"], env=env, check=True, cwd=ROOT)
  assert log.read_text().split("\n")[:-1] == ["compute", "tpus", "tpu-vm", "delete",
                                              "stt-v4-8", "--zone", "us-central2-b", "--quiet"]
