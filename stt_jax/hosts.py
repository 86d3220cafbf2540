"""What the processes of a multi-host run must agree on: decided once, by process 0, and shared.

Every host reads the same workdir, but not at the same moment: a marker file that process 0
writes may not be there yet when another host looks, and two hosts that take different branches
before a collective deadlock. So each decision that leads to a collective (skip a stage, which
checkpoints to score, whether training has finished) is made on process 0 and broadcast with
`agree`; a file that other hosts will read is written by process 0 before a `barrier`.
In a single process every function here is a no-op.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from stt_jax import errors

# Messages of a collective or of the coordination service whose peer process is gone.
_PEER_LOST = re.compile(
    r"Gloo|gloo|DEADLINE_EXCEEDED|UNAVAILABLE|coordination service|CoordinationService|"
    r"heartbeat|Connection reset|connection closed|Socket closed|barrier timed out", re.I)


def count() -> int:
  import jax  # pylint: disable=g-import-not-at-top  # main.py parses flags before jax loads
  return jax.process_count()


def is_main() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reached `name` (a unique label per call site and item)."""
  if count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def agree(value: Any) -> Any:
  """Process 0's `value` (anything JSON can carry) on every process.

  Sent as bytes in two broadcasts (length, then payload), so its size is not capped. Tuples
  come back as lists, as JSON has them.
  """
  if count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  payload = json.dumps(value, sort_keys=True).encode() if is_main() else b""
  size = multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int32))
  buf = np.zeros(int(np.asarray(size)[0]), np.uint8)
  if is_main():
    buf[:] = np.frombuffer(payload, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(bytes(buf.astype(np.uint8)).decode())


def peer_lost(error: BaseException) -> bool:
  """Whether `error` (or what it was raised from) says another process of this run is gone:
  a killed host shows up on the others as a timed-out or broken collective."""
  if count() == 1:
    return False
  return any(
      (type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") or
       isinstance(e, (ConnectionError, TimeoutError))) and _PEER_LOST.search(str(e))
      for e in errors.chain(error))


def all_hosts(flag: bool) -> bool:
  """True on every process when `flag` is true on every process (e.g. 'this host could read
  the checkpoint'): one host's failure then makes all of them take the same branch."""
  if count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.array([bool(flag)], np.bool_))))
