"""Fingerprints of the engine's behaviour: the weights every optimizer x scheme writes in a short run.

For a refactor that must change nothing (issue 23): each optimizer (zeroth- and first-order) under
each tuning scheme runs ``zotune train`` for a few steps on a tiny random Llama (built here from a
fixed seed, with the embedded model's tokenizer) and a small synthetic sentiment CSV. The
SHA-256 of its ``weights.safetensors`` (and of ``trajectory.bin`` for ZO) is the fingerprint.
Every hyperparameter is explicit, so a change of defaults does not show up as a change of
behaviour.

    .venv/bin/python benchmarks/fingerprint.py --save fingerprints.json   # before the change
    .venv/bin/python benchmarks/fingerprint.py --check fingerprints.json  # after: exit 1 on any change

The runs go to ``--workdir`` (default ``runs/fingerprint``, emptied first), the same path each
time, since a trajectory's header names the model's directory.

The hashes hold for one machine and one set of library versions (floating-point results depend
on both); compare them on the same machine, before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

STEPS = 3


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "-"


def fingerprints(root: Path) -> dict[str, dict[str, str]]:
    from zotune.config import SCHEMES, load_config
    from zotune.optim.registry import is_zeroth_order, optimizer_names
    from zotune.train.trainer import run_train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' fixture builders
    from tests.conftest import write_reviews_csv, write_tiny_llama

    model, csv = write_tiny_llama(root / "tiny-llama"), write_reviews_csv(root / "reviews.csv")
    out: dict[str, dict[str, str]] = {}
    for name in optimizer_names():
        for scheme in SCHEMES:
            zo = is_zeroth_order(name)
            cfg = load_config(None, [
                f"model.name={model}", f"task.path={csv}", "task.text_template={text} It was",
                'task.choices={"0": " bad", "1": " good"}', "task.k_shot=8", f"train.steps={STEPS}",
                "train.batch_size=4", "train.eval_every=0", "train.log_every=1", "eval.batch_size=8",
                "eval.max_examples=8", "eval.zero_shot=false", f"tuning.scheme={scheme}",
                f"optimizer.name={name}", "optimizer.lr=1e-3", *(["optimizer.eps=1e-3"] if zo else []),
                "tuning.lora.freeze_a=false", "seed=0",
            ])
            run = root / f"{name}-{scheme}"
            run_train(cfg, run, log=lambda *_: None)
            out[f"{name}/{scheme}"] = {"weights": sha256(run / "weights.safetensors"),
                                       "trajectory": sha256(run / "trajectory.bin")}
            print(f"{name:18s} {scheme:7s} {out[f'{name}/{scheme}']['weights']} {out[f'{name}/{scheme}']['trajectory']}",
                  flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path, help="write the fingerprints to this JSON file")
    parser.add_argument("--check", type=Path, help="compare with a saved JSON file; exit 1 on any difference")
    parser.add_argument("--workdir", type=Path, default=Path("runs/fingerprint"),
                        help="emptied and reused: a trajectory's header names the model's path, so it stays put")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # the same arithmetic whatever the machine's load
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    found = fingerprints(args.workdir.resolve())
    if args.save:
        args.save.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    if args.check:
        saved = json.loads(args.check.read_text())
        changed = sorted(k for k in saved.keys() | found.keys() if saved.get(k) != found.get(k))
        print(f"{len(found) - len(changed)} of {len(found)} unchanged" + (f"; changed: {', '.join(changed)}" if changed else ""))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
