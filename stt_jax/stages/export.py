"""The export stage: each variant's final checkpoint as folders that transformers and PEFT load.

    exports/<variant>/merged/      HF folder (config.json, safetensors, tokenizer files), LoRA
                                   merged in: AutoModelForCausalLM.from_pretrained(it)
    exports/<variant>/adapter/     PEFT LoRA adapter (LoRA runs only):
                                   PeftModel.from_pretrained(base model, it)
    exports/<variant>/export.json  marker: the step and the train_done.json it was made from

The final checkpoint is the step `runs/<variant>/train_done.json` records. A variant whose
marker names the same training is skipped (a rerun is a no-op; a retrained variant is exported
again). Each variant is written into `exports/<variant>.tmp/` and renamed into place, so a
killed export leaves no half folder. The frozen base is loaded in the dtype of the model's
files, so the merge is exact before the one rounding to that dtype on save. Multi-host: every
process restores the checkpoint (weights only) and takes part in the gathers; process 0 writes.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
import shutil

from stt_jax import appendlog, faults, hosts, sharding
from stt_jax import train as train_lib
from stt_jax.models import ModelConfig, hf_io, lora, peft_io
from stt_jax.preflight import PreflightError
from stt_jax.run_config import DTYPES
from stt_jax.workdir import Workdir, read_json, write_marker

log = logging.getLogger(__name__)


def files_dtype(model_path: str) -> str:
  """The dtype the model's weights are stored in (float32 when config.json does not say)."""
  dtype = ModelConfig.from_hf(model_path).checkpoint_dtype
  return dtype if dtype in DTYPES else "float32"


def stamp(wd: Workdir, variant: str) -> dict | None:
  """What an export of `variant` is made from (its train_done.json), None if unfinished."""
  done = read_json(wd.train_done(variant))
  return None if done is None else {"step": int(done["step"]), "trained": done}


def run(cfg, wd: Workdir, tokenizer=None) -> None:
  """Exports every variant whose marker does not match its finished training."""
  del tokenizer  # The model folder's tokenizer files are copied as they are.
  mesh = None
  for variant in cfg.variants:
    want = hosts.agree(stamp(wd, variant))
    if want is None:
      raise PreflightError(f"export: variant {variant} has not finished training (no "
                           f"{wd.train_done(variant)}); run the 'train' stage first "
                           "(config.stages)")
    have = read_json(wd.export_done(variant)) or {}
    if hosts.agree({k: have.get(k) for k in want} == want):
      log.info("export: %s step %d already exported; skipping", variant, want["step"])
      continue
    mesh = mesh or sharding.config_mesh(cfg.mesh)
    export_variant(cfg, wd, variant, want, mesh)


def export_variant(cfg, wd: Workdir, variant: str, want: dict, mesh) -> None:
  """Restores the variant's final step and writes merged/ (+ adapter/) and the marker."""
  dtype = files_dtype(cfg.model.path)
  load_cfg = copy.deepcopy(cfg)
  load_cfg.train.dtype = dtype  # The frozen LoRA base, as stored: an exact merge.
  model, step = train_lib.load_trained(cfg.model.path, wd.run(variant), load_cfg, mesh=mesh,
                                       step=want["step"])
  tmp, out = wd.export_tmp(variant), wd.export(variant)
  if hosts.is_main():
    for stale in [tmp] + glob.glob(glob.escape(out) + ".old-*"):
      shutil.rmtree(stale, ignore_errors=True)  # Left by a killed export.
    os.makedirs(tmp)
  hosts.barrier(f"export-{variant}-tmp")
  hf_io.save_hf(model, model.config, os.path.join(tmp, "merged"), tokenizer_dir=cfg.model.path,
                dtype=dtype)
  adapter = lora.has_lora(model)
  if adapter:
    peft_io.save_peft(model, model.config, os.path.join(tmp, "adapter"),
                      base_model_name_or_path=os.path.abspath(cfg.model.path))
  if hosts.is_main():
    write_marker(os.path.join(tmp, "export.json"),
                 {**want, "dtype": dtype, "merged": "merged",
                  "adapter": "adapter" if adapter else None})
    faults.point("export.written")
    appendlog.replace_dir(tmp, out)
    log.info("export: %s step %d -> %s", variant, step, out)
  hosts.barrier(f"export-{variant}-done")
