"""Tasks: GSM8K->MGSM, SQuAD->XQuAD, MultiNLI->XNLI.

  task = get_task("mgsm")                 # or "xquad", "xnli" and aliases
  rows = task.load("test", "de")          # list of dicts, each with an `id`
  prompt, target = task.format_prompt(rows[0]), task.format_target(rows[0])
  task.score(generated_texts, rows)       # {"accuracy": ...}
"""

from stt_jax.tasks.base import DATA_DIR
from stt_jax.tasks.base import DataNotFoundError
from stt_jax.tasks.base import Field
from stt_jax.tasks.base import Rows
from stt_jax.tasks.base import Split
from stt_jax.tasks.base import Task
from stt_jax.tasks.mgsm import Mgsm
from stt_jax.tasks.xnli import Xnli
from stt_jax.tasks.xquad import Xquad

# The languages the reproduction tests in (English is the source).
TARGET_LANGS = ("de", "ru", "th", "zh")

TASKS = {task.name: task for task in (Mgsm(), Xquad(), Xnli())}
_BY_NAME = {alias: task for task in TASKS.values()
            for alias in (task.name, *task.aliases)}


def get_task(name: str) -> Task:
  """The task for a name or alias (gsm8k, squad, mnli, multi_nli)."""
  key = name.strip().lower().replace("-", "_")
  if key not in _BY_NAME:
    known = ", ".join(f"{t.name} (aliases: {', '.join(t.aliases)})"
                      for t in TASKS.values())
    raise ValueError(f"Unknown task {name!r}; known tasks: {known}")
  return _BY_NAME[key]
