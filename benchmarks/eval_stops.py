"""How MGSM eval generations end with a real model: by a stop string / EOS, or by the budget.

If answers are cut before "The answer is N", accuracy measures the token budget, not the
model (Thai needs several times the tokens of English). This decodes the first --n MGSM test
questions per language with the demo model (Qwen2.5-Coder-0.5B-Instruct, zero-shot prompt,
the task's stops "\\n\\n" and "\\nQuestion:") under each language's paper budget
(configs/mgsm_<lang>.py: eval.max_new_tokens; English uses the de budget) and prints, per
language, how many generations stopped, how many hit the budget, and their token lengths.

    python benchmarks/eval_stops.py [--n=8] [--langs=en,zh,th] [--budget=0 (paper)]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from stt_jax import generation, run_config  # pylint: disable=g-import-not-at-top
from stt_jax.engine import Engine  # pylint: disable=g-import-not-at-top
from stt_jax.models import load_hf  # pylint: disable=g-import-not-at-top
from stt_jax.tasks import get_task  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--n", type=int, default=8)
  parser.add_argument("--langs", default="en,zh,th")
  parser.add_argument("--budget", type=int, default=0, help="0: the paper config's")
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  path = run_config.demo_model_path()
  model, _ = load_hf(path, dtype="float32")
  tok = transformers.AutoTokenizer.from_pretrained(path)
  task = get_task("mgsm")
  engine = Engine(model, slots=args.batch_size)
  rows = []
  for lang in args.langs.split(","):
    budget = args.budget or run_config.paper_config("mgsm", "de" if lang == "en" else
                                                    lang).eval.max_new_tokens
    test = task.load("test", lang, limit=args.n)
    start = time.perf_counter()
    done = [None] * len(test)
    for i, c in generation.generate_stream(model, tok, [task.format_prompt(r) for r in test],
                                           max_new_tokens=budget, stop=task.stop_sequences,
                                           engine=engine, details=True, desc=f"mgsm {lang}"):
      done[i] = c
    lengths = np.array([c.num_tokens for c in done])
    acc = np.mean([task.example_scores(c.text, r)["accuracy"] for c, r in zip(done, test)])
    rows.append((lang, len(test), budget, sum(c.stopped for c in done),
                 sum(not c.stopped for c in done), int(np.median(lengths)), int(lengths.max()),
                 acc, time.perf_counter() - start))
  print("\n| lang | n | budget | ended by stop/EOS | hit budget | median tokens | max tokens "
        "| accuracy | seconds |\n|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} | {r[7]:.2f} "
          f"| {r[8]:.0f} |")


if __name__ == "__main__":
  main()
