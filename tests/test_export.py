"""Saved weights: eval --weights reproduces the run's predictions; export loads in plain transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from zotune.cli import main
from zotune.train.trainer import run_eval, run_train

from .test_trainer import config

QUIET = {"log": lambda *_: None}


def predictions(path):
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("scheme", ["lora", "lora-fa", "full", "prefix"])
def test_save_load_eval_and_export(tiny_model_dir, reviews_csv, tmp_path, scheme, capsys):
    run = tmp_path / "run"
    fa = scheme == "lora-fa"  # LoRA-FA: A frozen at its seeded init, rebuilt with the model on load
    scheme = "lora" if fa else scheme
    extra = ["tuning.scheme=" + scheme, "optimizer.lr=5e-2" if scheme == "lora" else "optimizer.lr=1e-3",
             "train.eval_every=0", "eval.zero_shot=false", f"tuning.lora.freeze_a={str(fa).lower()}"]
    run_train(config(tiny_model_dir, reviews_csv, *extra), run, **QUIET)
    assert (run / "adapter").is_dir() == (scheme != "full")
    if fa:
        from safetensors.torch import load_file

        saved = load_file(str(run / "weights.safetensors"))
        assert saved and all(".lora_B." in name for name in saved)
    # save -> load -> eval: the same predictions and scores
    ev = run_eval(config(tiny_model_dir, reviews_csv, *extra), tmp_path / "ev", weights=run / "weights.safetensors", **QUIET)
    assert predictions(tmp_path / "ev" / "predictions.jsonl") == predictions(run / "predictions.jsonl")
    assert ev["eval"] == json.loads((run / "summary.json").read_text())["eval"]
    out = tmp_path / "export"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    if scheme == "prefix":
        assert (out / "adapter_config.json").is_file()  # no merged form: the peft adapter
        return
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    # the merged model scores like the adapter model inside zotune
    from zotune.train.trainer import Session
    from zotune.config import load_config
    from zotune.train.weights import load_weights

    session = Session.build(load_config(run / "config.yaml"), lambda *_: None, with_data=False)
    load_weights(run / "weights.safetensors", session.named_trainable())
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, session.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    if scheme == "lora":  # the adapter did move: the merge is not the base model
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        with torch.no_grad():
            assert not torch.allclose(base(ids).logits, merged(ids).logits)


def test_bad_weights_are_refused(tiny_model_dir, reviews_csv, tmp_path, capsys):
    run = tmp_path / "run"
    run_train(config(tiny_model_dir, reviews_csv, "tuning.scheme=lora", "train.steps=1", "train.eval_every=0",
                     "eval.zero_shot=false"), run, **QUIET)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    argv = ["eval", "--out", str(tmp_path / "e"), f"model.name={tiny_model_dir}", f"task.path={reviews_csv}",
            "task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}']
    assert main([*argv, "--weights", str(tmp_path / "junk.safetensors")]) == 2
    assert "cannot read weights" in capsys.readouterr().err
    assert main([*argv, "--weights", str(run / "weights.safetensors"), "--overwrite"]) == 2  # lora weights, full model
    assert "do not fit this model" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
