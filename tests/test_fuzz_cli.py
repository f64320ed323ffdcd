"""Malformed input of every kind: one line, exit 2, no traceback, nothing outside --out touched."""

from __future__ import annotations

import hashlib

import pytest

from zotune.cli import main


def snapshot(root, skip):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


def cases(model, csv, tmp):
    """(name, files to write, argv after `zotune`); {model} {csv} {tmp} are filled in."""
    task = ["task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}']
    base = [f"model.name={model}", f"task.path={csv}", *task]
    return [
        ("unknown key", {}, ["train", *base, "train.stepz=3"]),
        ("unknown section", {}, ["train", *base, "trainer.steps=3"]),
        ("steps as text", {}, ["train", *base, "train.steps=many"]),
        ("negative steps", {}, ["train", *base, "train.steps=-1"]),
        ("zero batch", {}, ["train", *base, "train.batch_size=0"]),
        ("negative lr", {}, ["train", *base, "optimizer.lr=-1"]),
        ("zero eps", {}, ["train", *base, "optimizer.eps=0"]),
        ("lr as list", {}, ["train", *base, "optimizer.lr=[1,2]"]),
        ("bool as int", {}, ["train", *base, "optimizer.blockwise=3"]),
        ("unknown optimizer", {}, ["train", *base, "optimizer.name=ZOSDG"]),
        ("unknown distribution", {}, ["train", *base, "optimizer.distribution=uniform"]),
        ("bad optimizer option", {}, ["train", *base, "optimizer.options={momentum: 2.0}", "optimizer.name=ZOSGDMomentum"]),
        ("unknown scheme", {}, ["train", *base, "tuning.scheme=adapters"]),
        ("negative lora rank", {}, ["train", *base, "tuning.scheme=lora", "tuning.lora.r=-2"]),
        ("unknown dtype", {}, ["train", *base, "model.dtype=float8"]),
        ("missing model", {}, ["train", "model.name=/no/such/model", f"task.path={csv}", *task]),
        ("huge sequence length", {}, ["train", *base, "train.max_length=100000000"]),
        ("tiny sequence length", {}, ["train", *base, "train.max_length=2"]),
        ("missing data file", {}, ["train", f"model.name={model}", "task.path={tmp}/none.csv", *task]),
        ("data not csv/jsonl", {"d.txt": b"text,label\n"}, ["train", f"model.name={model}", "task.path={tmp}/d.txt", *task]),
        ("empty data file", {"e.csv": b""}, ["train", f"model.name={model}", "task.path={tmp}/e.csv", *task]),
        ("header only", {"h.csv": b"text,label\n"}, ["train", f"model.name={model}", "task.path={tmp}/h.csv", *task]),
        ("non-UTF-8 data", {"l.csv": "text,label\ncaf\xe9,1\n".encode("latin-1")},
         ["train", f"model.name={model}", "task.path={tmp}/l.csv", *task]),
        ("label not in choices", {"b.csv": b"text,label\na,7\nb,1\nc,0\n"},
         ["train", f"model.name={model}", "task.path={tmp}/b.csv", *task]),
        ("missing label column", {"m.csv": b"text,y\na,1\n"}, ["train", f"model.name={model}", "task.path={tmp}/m.csv", *task]),
        ("broken jsonl", {"j.jsonl": b'{"text": "a", "label": 1}\n{oops\n'},
         ["train", f"model.name={model}", "task.path={tmp}/j.jsonl", *task]),
        ("template not a column", {}, ["train", f"model.name={model}", f"task.path={csv}",
                                      "task.text_template={review} It was", 'task.choices={"0": " bad", "1": " good"}']),
        ("one choice", {}, ["train", f"model.name={model}", f"task.path={csv}", "task.text_template={text}",
                            'task.choices={"0": " bad"}']),
        ("unknown metric", {}, ["train", *base, "task.metric=bleu"]),
        ("unknown task", {}, ["train", "task.name=sst3"]),
        ("config file missing", {}, ["train", "--config", "{tmp}/none.yaml"]),
        ("config not YAML", {"c.yaml": b"model: [unclosed\n"}, ["train", "--config", "{tmp}/c.yaml"]),
        ("config a list", {"l.yaml": b"- 1\n- 2\n"}, ["train", "--config", "{tmp}/l.yaml"]),
        ("config not UTF-8", {"n.yaml": b"seed: \xff\xfe\n"}, ["train", "--config", "{tmp}/n.yaml"]),
        ("override without =", {}, ["train", *base, "train.steps"]),
        ("objective with FO", {}, ["train", *base, "train.objective=accuracy", "optimizer.name=AdamW"]),
        ("bad eval baseline", {}, ["eval", *base, "eval.baseline=oracle"]),
        ("weights missing", {}, ["eval", *base, "--weights", "{tmp}/none.safetensors"]),
        ("replay of nothing", {}, ["replay", "--run", "{tmp}/nothing"]),
        ("export of nothing", {}, ["export", "--run", "{tmp}/nothing"]),
    ]


def test_at_least_thirty_malformed_inputs(tiny_model_dir, reviews_csv, tmp_path):
    assert len(cases(tiny_model_dir, reviews_csv, tmp_path)) >= 30


@pytest.mark.parametrize("index", range(40))
def test_malformed_input_gives_one_line(index, tiny_model_dir, reviews_csv, tmp_path, capsys):
    name, files, argv = cases(tiny_model_dir, reviews_csv, tmp_path)[index]
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    (tmp_path / "keep.txt").write_text("user file")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    argv = argv[:1] + ["--out", str(out)] + argv[1:]
    before = snapshot(tmp_path, out)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (name, err)
    lines = err.splitlines()
    assert lines and lines[-1].startswith("zotune: error: ") and "Traceback" not in err, (name, err)
    assert all(line.startswith("zotune: warning: ") for line in lines[:-1]), (name, err)
    assert snapshot(tmp_path, out) == before, name
    assert not (out / "config.yaml").exists(), name
