"""`zotune export`: a run's tuned weights as a directory that Hugging Face loads directly.

LoRA is merged into the base weights (peft's ``merge_and_unload``) and full fine-tunes are
written as they are: both give a plain ``AutoModelForCausalLM`` directory (safetensors,
config, tokenizer). Prefix and prompt tuning have no merged form: their export is the peft
adapter directory (``PeftModel.from_pretrained(base, DIR)``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import OWN_WEIGHTS_SCHEMES
from ..errors import ConfigError, DataError
from .rundir import run_config
from .trainer import Session
from .weights import FILENAME as WEIGHTS
from .weights import load_weights


def run_export(run_dir: str | Path, out: str | Path, weights: str | Path | None = None, overwrite: bool = False,
               log=print) -> dict[str, Any]:
    """``zotune export``: load the run's tuned weights into its model and write a Hugging Face directory to ``out``
    (LoRA merged; prefix and prompt tuning as a peft adapter) with ``zotune_export.json``; returns the kind and
    ``out``."""
    src = Path(run_dir)
    weights = Path(weights) if weights is not None else src / WEIGHTS
    if not weights.is_file():
        raise DataError(f"no tuned weights at {weights} (did the run finish?)")
    cfg = run_config(src)
    if not cfg.task.get("align", True):
        raise ConfigError("this run classifies with a linear head (task.align: false), which a causal LM "
                          "directory cannot hold; evaluate it with `zotune eval --weights` instead")
    target = Path(out)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise ConfigError(f"--out {target} is not empty; choose another directory or pass --overwrite")
    session = Session.build(cfg, log, with_data=False)
    load_weights(weights, session.named_trainable())
    model, scheme = session.model, cfg.tuning.scheme
    if scheme == "lora":
        model = model.merge_and_unload()
        kind = "merged LoRA"
    elif scheme in OWN_WEIGHTS_SCHEMES:
        kind = "full weights"
    else:
        kind = f"{scheme}-tuning adapter (peft format; no merged form)"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    session.tokenizer.save_pretrained(target)
    note = {"source_run": str(src), "weights": str(weights), "scheme": scheme, "kind": kind, "model": cfg.model.name}
    (target / "zotune_export.json").write_text(json.dumps(note, indent=2) + "\n", encoding="utf-8")
    log(f"exported {kind} of {src} to {target}")
    return {"kind": kind, "out": str(target)}
