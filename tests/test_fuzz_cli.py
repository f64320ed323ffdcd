"""Malformed input of every kind: one line, exit 2, no traceback, nothing outside --out touched."""

from __future__ import annotations

import hashlib

import pytest

from zotune.cli import main


def snapshot(root, skip):
    return {p.relative_to(root): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and skip not in p.parents}


TASK = ["task.text_template={text} It was", 'task.choices={"0": " bad", "1": " good"}']
BASE = ["model.name={model}", "task.path={csv}", *TASK]
# (name, files to write, argv after `zotune`); {model} {csv} {tmp} are filled in by the test
CASES = [
    ("unknown key", {}, ["train", *BASE, "train.stepz=3"]),
    ("unknown section", {}, ["train", *BASE, "trainer.steps=3"]),
    ("steps as text", {}, ["train", *BASE, "train.steps=many"]),
    ("negative steps", {}, ["train", *BASE, "train.steps=-1"]),
    ("zero batch", {}, ["train", *BASE, "train.batch_size=0"]),
    ("negative lr", {}, ["train", *BASE, "optimizer.lr=-1"]),
    ("zero eps", {}, ["train", *BASE, "optimizer.eps=0"]),
    ("lr as list", {}, ["train", *BASE, "optimizer.lr=[1,2]"]),
    ("bool as int", {}, ["train", *BASE, "optimizer.blockwise=3"]),
    ("unknown optimizer", {}, ["train", *BASE, "optimizer.name=ZOSDG"]),
    ("unknown distribution", {}, ["train", *BASE, "optimizer.distribution=uniform"]),
    ("bad optimizer option", {}, ["train", *BASE, "optimizer.options={momentum: 2.0}", "optimizer.name=ZOSGDMomentum"]),
    ("unknown scheme", {}, ["train", *BASE, "tuning.scheme=adapters"]),
    ("negative lora rank", {}, ["train", *BASE, "tuning.scheme=lora", "tuning.lora.r=-2"]),
    ("unknown dtype", {}, ["train", *BASE, "model.dtype=float8"]),
    ("missing model", {}, ["train", "model.name=/no/such/model", "task.path={csv}", *TASK]),
    ("huge sequence length", {}, ["train", *BASE, "train.max_length=100000000"]),
    ("tiny sequence length", {}, ["train", *BASE, "train.max_length=2"]),
    ("missing data file", {}, ["train", "model.name={model}", "task.path={tmp}/none.csv", *TASK]),
    ("data not csv/jsonl", {"d.txt": b"text,label\n"}, ["train", "model.name={model}", "task.path={tmp}/d.txt", *TASK]),
    ("empty data file", {"e.csv": b""}, ["train", "model.name={model}", "task.path={tmp}/e.csv", *TASK]),
    ("header only", {"h.csv": b"text,label\n"}, ["train", "model.name={model}", "task.path={tmp}/h.csv", *TASK]),
    ("non-UTF-8 data", {"l.csv": "text,label\ncaf\xe9,1\n".encode("latin-1")},
     ["train", "model.name={model}", "task.path={tmp}/l.csv", *TASK]),
    ("label not in choices", {"b.csv": b"text,label\na,7\nb,1\nc,0\n"},
     ["train", "model.name={model}", "task.path={tmp}/b.csv", *TASK]),
    ("missing label column", {"m.csv": b"text,y\na,1\n"}, ["train", "model.name={model}", "task.path={tmp}/m.csv", *TASK]),
    ("broken jsonl", {"j.jsonl": b'{"text": "a", "label": 1}\n{oops\n'},
     ["train", "model.name={model}", "task.path={tmp}/j.jsonl", *TASK]),
    ("template not a column", {}, ["train", "model.name={model}", "task.path={csv}",
                                  "task.text_template={review} It was", 'task.choices={"0": " bad", "1": " good"}']),
    ("one choice", {}, ["train", "model.name={model}", "task.path={csv}", "task.text_template={text}",
                        'task.choices={"0": " bad"}']),
    ("unknown metric", {}, ["train", *BASE, "task.metric=bleu"]),
    ("unknown task", {}, ["train", "task.name=sst3"]),
    ("config file missing", {}, ["train", "--config", "{tmp}/none.yaml"]),
    ("config not YAML", {"c.yaml": b"model: [unclosed\n"}, ["train", "--config", "{tmp}/c.yaml"]),
    ("config a list", {"l.yaml": b"- 1\n- 2\n"}, ["train", "--config", "{tmp}/l.yaml"]),
    ("config not UTF-8", {"n.yaml": b"seed: \xff\xfe\n"}, ["train", "--config", "{tmp}/n.yaml"]),
    ("override without =", {}, ["train", *BASE, "train.steps"]),
    ("objective with FO", {}, ["train", *BASE, "train.objective=accuracy", "optimizer.name=AdamW"]),
    ("bad eval baseline", {}, ["eval", *BASE, "eval.baseline=oracle"]),
    ("weights missing", {}, ["eval", *BASE, "--weights", "{tmp}/none.safetensors"]),
    ("replay of nothing", {}, ["replay", "--run", "{tmp}/nothing"]),
    ("export of nothing", {}, ["export", "--run", "{tmp}/nothing"]),
]


def test_at_least_thirty_malformed_inputs():
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, files, argv", CASES, ids=[name for name, _, _ in CASES])
def test_malformed_input_gives_one_line(name, files, argv, tiny_model_dir, reviews_csv, tmp_path, capsys):
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    (tmp_path / "keep.txt").write_text("user file")
    out = tmp_path / "out"
    for mark, value in (("{tmp}", tmp_path), ("{model}", tiny_model_dir), ("{csv}", reviews_csv)):
        argv = [a.replace(mark, str(value)) for a in argv]
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
