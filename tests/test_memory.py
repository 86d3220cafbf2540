"""stt_jax.memory (a stage's resident peak) and the report's time-and-memory table."""

import json

import numpy as np

from stt_jax import memory
from stt_jax.stages import report
from stt_jax.workdir import Workdir


def test_peak_is_the_blocks_own_and_counts_an_allocation():
  big = np.ones(512 * 2**20 // 8)  # 512 MiB touched, then freed: the process's maxrss has it.
  del big
  memory.release()
  with memory.Peak() as outer:
    pass
  with memory.Peak() as peak:
    a = np.ones(256 * 2**20 // 8)  # 256 MiB, resident.
    a[::512] += 1
    del a
  if peak.since == "stage":  # Reset permitted: the earlier 512 MiB is not this block's.
    assert 256 * 2**20 <= peak.bytes < outer.bytes + 400 * 2**20
  else:
    assert peak.bytes >= 512 * 2**20
  assert 0 < peak.end_bytes < peak.bytes


def test_report_lists_each_stage_time_and_highest_peak(tmp_path):
  wd = Workdir(str(tmp_path))
  rows = [("translate", 100.0, 3.5, "stage"), ("train", 300.0, 6.25, "stage"),
          ("train", 20.0, 2.0, "stage"), ("eval", 65.0, 5.0, "process")]
  with open(wd.resources, "w", encoding="utf-8") as f:
    for stage, seconds, peak, since in rows:
      f.write(json.dumps({"stage": stage, "seconds": seconds, "peak_rss_gib": peak,
                          "end_rss_gib": 1.0, "peak_since": since}) + "\n")
    f.write('{"stage": "export", "sec')  # A torn last line is skipped.
  md = report.resources([wd.root])
  assert "| translate | 1 | 1 min 40 s | 3.50 |" in md
  assert "| train | 2 | 5 min 20 s | 6.25 |" in md  # Seconds add up; the highest peak.
  assert "| eval | 1 | 1 min 05 s | 5.00 ‡ |" in md
  assert "export" not in md
  assert report.resources([str(tmp_path / "none")]) == ""
