"""Multi-process runs: a parent process that turns the loss of a peer into one error line.

When one process of a multi-host run dies, the others learn it in one of two ways. Blocked in
a collective, they get a Python exception (`hosts.peer_lost`; `cli.one_line_errors` prints
one line). But when the dead process hosted JAX's coordination service (process 0), the
coordination client aborts the survivors from a C++ thread (client.h: "Terminating process
because the JAX distributed service detected fatal errors"), and no Python handler runs. So
in a multi-process run `python -m stt_jax.main` runs the real work in a child process; this
parent forwards SIGTERM/SIGINT to it, waits, and when the child was killed by a signal writes
the one line as the last output. The child dies with the parent (PR_SET_PDEATHSIG), so a
`kill -9` of the parent stops the whole process, as a user expects.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

CHILD_ENV = "STT_JAX_SUPERVISED"
_PR_SET_PDEATHSIG = 1


def multi_process(argv: list[str]) -> bool:
  """Whether this command starts one process of several (flags, our env, or a TPU VM)."""
  if os.environ.get(CHILD_ENV):
    return False
  flags = " ".join(argv)
  return bool(os.environ.get("STT_JAX_COORDINATOR") or "--coordinator" in flags or
              os.environ.get("TPU_WORKER_HOSTNAMES") or
              os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def _die_with_parent() -> None:  # Runs in the child between fork and exec.
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):  # Not Linux: the child may outlive a killed parent.
    pass


def _process_label(argv: list[str]) -> str:
  pid = os.environ.get("STT_JAX_PROCESS_ID") or os.environ.get("TPU_WORKER_ID")
  for arg in argv:
    if arg.startswith("--process_id="):
      pid = arg.split("=", 1)[1]
  return f"process {pid}" if pid not in (None, "") else "this process"


def run(module: str, argv: list[str]) -> int:
  """Runs `python -m module argv[1:]` as a supervised child; returns the exit code to use."""
  env = dict(os.environ, **{CHILD_ENV: "1"})
  child = subprocess.Popen([sys.executable, "-m", module, *argv[1:]], env=env,
                           preexec_fn=_die_with_parent if sys.platform == "linux" else None)
  forward = lambda signum, frame: child.send_signal(signum)
  for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, forward)
  while True:
    try:
      code = child.wait()
      break
    except InterruptedError:
      continue
  if code >= 0 and code != 134:  # 134: the shell's way of saying SIGABRT.
    return code
  name = signal.Signals(-code).name if code < 0 else "SIGABRT"
  sys.stdout.flush()
  sys.stderr.write(
      f"\nerror: {_process_label(argv)} of this multi-process run was stopped by {name} "
      "(JAX aborts every process once one of the run dies or loses contact: see the other "
      "processes' logs for the first error); rerun the same command on every host: finished "
      "work is kept\n")
  sys.stderr.flush()
  return 1
