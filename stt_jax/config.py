"""Config schema checks: a run's ConfigDict must have exactly the fields of configs/base.py.

ml_collections already rejects unknown `--config.x=...` overrides on a locked config; this
module also catches typos inside config *files* (a task file that sets `train.lrr`), wrong
types, and bad enum values, each as one line naming the key, with the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
import sysconfig
from collections.abc import Mapping
from typing import Any

import ml_collections


class ConfigKeyError(ValueError):
  """A config that does not fit the schema."""


_FRAME = re.compile(r'File "([^"]+)", line (\d+)(?:, in \S+)?\n[ \t]*(\S[^\n]*)')
_LIBRARY = ("site-packages", "dist-packages", sysconfig.get_paths()["stdlib"])


def config_file_error(text: str) -> str | None:
  """One line for an exception raised while a config file ran, or None for other flag errors.

  absl reports those with the whole traceback inside the flag error; the useful parts are the
  config file's line (which names the key) and the exception's last line.
  """
  if "Error whilst parsing config file" not in text:
    return None
  frames = [m for m in _FRAME.finditer(text) if not any(lib in m.group(1) for lib in _LIBRARY)]
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  where = ""
  if frames:
    path, line, code = frames[-1].groups()
    where = f"{path}:{line}: {code}: "
  return f"config: {where}{lines[-1]}"


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def nearest(key: str, valid: list[str]) -> str:
  near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
  if not near:  # Try the last component alone (e.g. 'lrr' -> 'train.lr').
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {v.rsplit(".", 1)[-1]: v for v in valid}
    hit = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
    near = [by_leaf[hit[0]]] if hit else []
  return f"; did you mean '{near[0]}'?" if near else ""


def validate(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
             choices: Mapping[str, tuple] | None = None) -> None:
  """Raises ConfigKeyError for unknown keys, wrong types or values outside `choices`.

  Fields whose schema default is None accept any value; dict-valued fields (e.g. mixture
  weights) are checked key by key like any other section.
  """
  have, want = flatten(cfg), flatten(schema)
  for key in sorted(have):
    if key not in want:
      raise ConfigKeyError(f"config: unknown key '{key}'{nearest(key, sorted(want))}")
  for key, default in want.items():
    if key not in have:
      raise ConfigKeyError(f"config: missing key '{key}' (default {default!r}); "
                           "start task configs from configs/base.py")
    value = have[key]
    if default is None or value is None:
      continue
    if isinstance(default, bool) != isinstance(value, bool):
      raise ConfigKeyError(f"config: '{key}' must be a bool, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
      if not isinstance(value, (int, float)):
        raise ConfigKeyError(f"config: '{key}' must be a number, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
      raise ConfigKeyError(f"config: '{key}' must be a string, got {value!r}")
    elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
      raise ConfigKeyError(f"config: '{key}' must be a list, got {value!r}")
  for key, allowed in (choices or {}).items():
    values = have.get(key)
    for v in values if isinstance(values, (list, tuple)) else [values]:
      if v not in allowed:
        raise ConfigKeyError(
            f"config: '{key}' = {v!r} is not one of {', '.join(map(str, allowed))}")
