"""Task data sources: the BIG-bench sdist fetcher (against a fake archive served locally), its
reader, the hub row transforms, the built-in task YAMLs and `zotune tasks`."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import io
import json
import tarfile
import threading

import pytest

from zotune.errors import ConfigError, DataError
from zotune.tasks import builtin_tasks, list_tasks, load_task, make_spec, task_spec
from zotune.tasks import bigbench, fetch
from zotune.tasks.data import MOVED, _examples, _transformed, parse_hf
from zotune.tasks.bigbench import BigBenchTask, bigbench_rows, builtin_bigbench_tasks

BIGBENCH_TASKS = builtin_bigbench_tasks()
from zotune.tasks.transforms import ROW_TRANSFORMS

TOP = "bigbench-1.0.0/"
OTHERS = [  # members that must not be extracted
    "bigbench/benchmark_tasks/analytic_entailment/task.json",
    "bigbench/benchmark_tasks/multiemo/all_sentence_de/task.json",
    "bigbench/benchmark_tasks/cause_and_effect/two_sentences/task.json",
    "bigbench/api/json_task.py",
]


def fake_task(name: str) -> dict:
    kind = BIGBENCH_TASKS[name].kind
    if kind == "generation":
        return {"examples": [{"input": f"What {i}?  \ncontext: It is {i} .", "target": f"{i}"} for i in range(3)]}
    pattern = {"vitaminc": "T: evidence {i}\nClaim: claim {i}",
               "intent_recognition": "Utterance: play song {i}",
               "presuppositions_as_nli": "Sentence 1: p {i}. \nSentence 2: h {i}.\n\nThe answer is: "}
    text = pattern.get(name, "sentence {i}")
    return {"name": name, "examples": [{"input": text.format(i=i), "target_scores": {"a": 1, "b": 0}}
                                       for i in range(3)]}


def build_archive(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(TOP + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Index:
    """A package index on 127.0.0.1 serving a fake bigbench sdist: /simple/bigbench/ links to it."""

    def __init__(self, root, sha: str, listed_sha: str | None = None) -> None:
        (root / "simple" / "bigbench").mkdir(parents=True)
        (root / "simple" / "bigbench" / "index.html").write_text(
            f'<html><body><a href="../../packages/bigbench-1.0.0.tar.gz#sha256={listed_sha or sha}">'
            "bigbench-1.0.0.tar.gz</a></body></html>")
        self.requests: list[str] = []
        index = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                index.requests.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def archive_requests(self) -> int:
        return sum(p.endswith(".tar.gz") for p in self.requests)


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A fake sdist with every needed task.json plus other members, behind a local index;
    the cache in tmp_path; the pinned URL unreachable (nothing here may reach the network)."""
    root = tmp_path / "index"
    (root / "packages").mkdir(parents=True)
    members = {f"bigbench/benchmark_tasks/{t.path}/task.json": json.dumps(fake_task(name)).encode()
               for name, t in BIGBENCH_TASKS.items()}
    members.update({name: b"{}" for name in OTHERS})
    members[OTHERS[0]] = json.dumps({"examples": [{"input": f"sentence {i}", "target_scores": {"a": i % 2, "b": 1 - i % 2}}
                                                  for i in range(8)]}).encode()  # read by a task of the user's own
    sha = build_archive(root / "packages" / "bigbench-1.0.0.tar.gz", members)
    index = Index(root, sha)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "ZOTUNE_BIGBENCH_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", index.url + "/simple")
    monkeypatch.setattr(bigbench, "BIGBENCH_SHA256", sha)
    monkeypatch.setattr(bigbench, "BIGBENCH_PINNED_URL", "http://127.0.0.1:9/packages/bigbench-1.0.0.tar.gz")
    yield index
    index.server.shutdown()


def cached_files(tmp_path) -> set[str]:
    root = tmp_path / "cache" / "data" / "bigbench"
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()


def test_fetch_extracts_only_the_needed_members_in_one_download(fake_pypi, tmp_path):
    paths = bigbench.fetch_bigbench()
    assert cached_files(tmp_path) == {f"{t.path}/task.json" for t in BIGBENCH_TASKS.values()}
    assert set(paths) == set(BIGBENCH_TASKS) and all(p.is_file() for p in paths.values())
    assert fake_pypi.archive_requests() == 1 and fake_pypi.requests[0] == "/simple/bigbench/"
    assert bigbench.read_bigbench("winowhy") == [{"input": f"sentence {i}", "label": "a"} for i in range(3)]
    bigbench.fetch_bigbench()  # cached: no second download
    assert fake_pypi.archive_requests() == 1
    assert bigbench.read_bigbench("disfl_qa")[0] == {"question": "What 0?", "context": "It is 0 .", "answers": ["0"]}


def test_a_new_bigbench_task_is_a_yaml_file(fake_pypi, tmp_path):
    """A BIG-bench task that is not built in: its YAML's ``bigbench:`` key names the JSON task and how
    its inputs split into fields; loaded through the same one download (here: a member of the fake
    archive that no built-in task reads)."""
    from zotune.config import load_config

    yaml_file = tmp_path / "entailment.yaml"
    yaml_file.write_text(
        "task:\n  name: analytic\n  bigbench: {task: analytic_entailment, pattern: '(?s)(?P<premise>.+)'}\n"
        "  text_template: '{premise} True or false?'\n  choices: {'a': ' true', 'b': ' false'}\n"
        "  k_shot: 1\n  n_dev: 0\n  eval_fraction: 0.5\n")
    cfg = load_config(yaml_file)
    spec = task_spec(cfg.task)
    assert spec.source == "bigbench" and spec.bigbench_task == BigBenchTask("analytic_entailment", "classification",
                                                                           "(?s)(?P<premise>.+)")
    data = load_task(spec, seed=0)
    assert sorted(e.label for e in data.train) == ["a", "b"] and len(data.test) == 4
    assert all(e.fields["premise"].startswith("sentence ") for e in data.train + data.test)
    assert fake_pypi.archive_requests() == 1
    assert "analytic_entailment/task.json" in cached_files(tmp_path)


@pytest.mark.parametrize("bigbench_key, message", [
    ("[intent_recognition]", "must be a mapping with 'task'"),
    ("{pattern: '(?P<x>.+)'}", "must be a mapping with 'task'"),
    ("{task: x, pattern: '(unclosed'}", "is not a valid regex"),
    ("{task: x, pattern: '.+'}", "named groups"),
    ("{task: x, rotate: yes please}", "rotate must be true or false"),
    ("{task: x, shuffle: true}", "unknown task.bigbench key 'shuffle'"),
])
def test_a_malformed_bigbench_key_is_one_config_error(bigbench_key, message):
    import yaml

    raw = {"bigbench": yaml.safe_load(bigbench_key), "text_template": "{input}", "choices": {"a": " a", "b": " b"}}
    with pytest.raises(ConfigError, match=message) as info:
        make_spec(raw)
    assert "\n" not in str(info.value)


def test_sha256_mismatch_is_refused_and_nothing_is_kept(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setattr(bigbench, "BIGBENCH_SHA256", "0" * 64)
    fake_pypi.requests.clear()
    (tmp_path / "index" / "simple" / "bigbench" / "index.html").write_text(
        '<a href="../../packages/bigbench-1.0.0.tar.gz">bigbench-1.0.0.tar.gz</a>')  # no #sha256= to skip it
    with pytest.raises(DataError, match=r"bigbench-1\.0\.0\.tar\.gz from http://127\.0\.0\.1:\d+/packages/"
                                        r"bigbench-1\.0\.0\.tar\.gz does not have the expected SHA-256") as info:
        bigbench.fetch_bigbench()
    assert "\n" not in str(info.value)
    assert cached_files(tmp_path) == set()  # not even a partial file


def test_index_listing_another_hash_is_skipped_for_the_pinned_url(fake_pypi, tmp_path, monkeypatch):
    (tmp_path / "index" / "simple" / "bigbench" / "index.html").write_text(
        f'<a href="../../packages/bigbench-1.0.0.tar.gz#sha256={"1" * 64}">bigbench-1.0.0.tar.gz</a>')
    monkeypatch.setattr(bigbench, "BIGBENCH_PINNED_URL", fake_pypi.url + "/packages/bigbench-1.0.0.tar.gz")
    urls, notes = bigbench._archive_urls()
    assert urls == [fake_pypi.url + "/packages/bigbench-1.0.0.tar.gz"] and "lists a different" in notes[0]


def test_offline_is_one_clear_line(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://user:secret@127.0.0.1:9/simple")  # nothing listens there
    with pytest.raises(DataError, match=r"cannot download bigbench-1\.0\.0\.tar\.gz from PyPI \(offline\?\)") as info:
        bigbench.read_bigbench("strategyqa")
    message = str(info.value)
    assert "\n" not in message and "secret" not in message and "ZOTUNE_BIGBENCH_URL" in message
    assert cached_files(tmp_path) == set()


def test_a_local_copy_of_the_archive_replaces_the_index(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("ZOTUNE_BIGBENCH_URL", str(tmp_path / "index" / "packages" / "bigbench-1.0.0.tar.gz"))
    assert bigbench.read_bigbench("strategyqa")[0] == {"input": "sentence 0", "label": "a"}
    assert fake_pypi.requests == []
    monkeypatch.setenv("ZOTUNE_BIGBENCH_URL", str(tmp_path / "nowhere.tar.gz"))
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError, match=r"cannot read bigbench-1\.0\.0\.tar\.gz .* from \$ZOTUNE_BIGBENCH_URL: "
                                        r"file://.*nowhere\.tar\.gz: .*No such file"):
        bigbench.read_bigbench("strategyqa")


def test_reader_rows():
    data = {"examples": [
        {"input": "q1", "target_scores": {"x": 0, "y": 1, "z": 0}},
        {"input": "tie", "target_scores": {"x": 1, "y": 1}},
        {"input": "none right", "target_scores": {"x": 0, "y": 0}},
        {"input": "q2", "target_scores": {"x": 1.0, "y": 0.0, "z": 0.5}},
    ]}
    assert bigbench_rows(data, BigBenchTask("t", "multiple_choice")) == [
        {"input": "q1", "candidates": ["x", "y", "z"], "label": 1},
        {"input": "q2", "candidates": ["x", "y", "z"], "label": 0}]
    assert bigbench_rows(data, BigBenchTask("t", "classification")) == [
        {"input": "q1", "label": "y"}, {"input": "q2", "label": "x"}]
    gold_first = {"examples": [{"input": "", "target_scores": {f"good {i}": 1, f"bad {i}": 0}} for i in range(4)]}
    rotated = bigbench_rows(gold_first, BigBenchTask("t", "multiple_choice", rotate=True))
    assert [r["label"] for r in rotated] == [0, 1, 0, 1]
    assert all(r["candidates"][r["label"]] == f"good {i}" for i, r in enumerate(rotated))
    gen = {"examples": [{"input": "Q a  \ncontext: C a", "target": "A"},
                        {"input": "Q b\ncontext: C b", "target": ["B", "b"]},
                        {"input": "Q c\ncontext: C c", "target": ""}]}
    spec = BigBenchTask("t", "generation", r"(?s)(?P<question>.+?)\s*\ncontext: (?P<context>.+)")
    assert bigbench_rows(gen, spec) == [{"question": "Q a", "context": "C a", "answers": ["A"]},
                                        {"question": "Q b", "context": "C b", "answers": ["B", "b"]}]
    with pytest.raises(DataError, match="example 1: input does not have the expected layout"):
        bigbench_rows({"examples": [{"input": "no context", "target": "A"}]}, spec)


# One row per hub dataset with its real column names (values made up), as `datasets` returns it.
HUB_ROWS = {
    "nyu-mll/glue:sst2": {"sentence": "a gem", "label": 1, "idx": 0},
    "SetFit/sst5:default": {"text": "a gem", "label": 4, "label_text": "very positive"},
    "stanfordnlp/snli": {"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0},
    "nyu-mll/glue:mnli": {"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0, "idx": 0},
    "aps/super_glue:rte": {"premise": "A man sleeps.", "hypothesis": "A man rests.", "idx": 0, "label": 0},
    "CogComp/trec": {"text": "Who wrote Hamlet ?", "coarse_label": 3, "fine_label": 29},
    "aps/super_glue:boolq": {"question": "is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
    "aps/super_glue:cb": {"premise": "He left.", "hypothesis": "He is gone.", "idx": 0, "label": 0},
    "aps/super_glue:wsc.fixed": {"text": "Mark told Pete he was late.", "span1_index": 0, "span2_index": 3,
                             "span1_text": "Mark", "span2_text": "He", "idx": 0, "label": 1},
    "aps/super_glue:wic": {"word": "bank", "sentence1": "The river bank.", "sentence2": "The bank loan.", "start1": 10,
                       "start2": 4, "end1": 14, "end2": 8, "idx": 0, "label": 0},
    "aps/super_glue:multirc": {"paragraph": "Tom is 5.", "question": "How old is Tom?", "answer": "5",
                           "idx": {"paragraph": 0, "question": 0, "answer": 0}, "label": 1},
    "aps/super_glue:copa": {"premise": "The man broke his toe.", "choice1": "He dropped a hammer on his foot.",
                        "choice2": "I got a hole in my sock.", "question": "cause", "idx": 0, "label": 0},
    "aps/super_glue:record": {"passage": "Obama met Merkel.\n@highlight\nThey talked", "query": "@placeholder spoke first.",
                          "entities": ["Obama", "Merkel"],
                          "entity_spans": {"text": ["Obama", "Merkel"], "start": [0, 10], "end": [5, 16]},
                          "answers": ["Merkel"], "idx": {"passage": 0, "query": 0}},
    "allenai/winogrande:winogrande_m": {"sentence": "Sarah beat Maria because _ trained more.", "option1": "Sarah",
                                "option2": "Maria", "answer": "1"},
    "rajpurkar/squad": {"id": "x", "title": "Hamlet", "context": "Shakespeare wrote Hamlet.", "question": "Who wrote Hamlet?",
              "answers": {"text": ["Shakespeare", "William Shakespeare"], "answer_start": [0, 0]}},
    "ucinlp/drop": {"section_id": "s", "query_id": "q", "passage": "3 and 4 goals.", "question": "How many goals?",
             "answers_spans": {"spans": ["7"], "types": ["number"]}},
}


def test_builtin_yamls_are_valid_and_offline_alternatives_exist():
    builtins = builtin_tasks()
    online = {"sst2", "sst5", "snli", "mnli", "rte", "trec", "boolq", "cb", "wsc", "wic", "multirc", "copa", "record",
              "winogrande", "squad", "drop"}
    offline = {"rotten_tomatoes", "cause_and_effect", "winowhy", "strategyqa", "vitaminc", "multiemo",
               "intent_recognition", "presuppositions_as_nli", "disambiguation_qa", "disfl_qa"}
    assert online | offline <= set(builtins)
    for name, raw in builtins.items():
        spec = make_spec(raw, default_name=name)
        assert spec.description, name
        if spec.source == "hf":
            assert spec.hf in HUB_ROWS, name
            if spec.offline_alternative:
                assert builtins[spec.offline_alternative]["source"] in ("package", "bigbench"), name
        elif spec.source == "bigbench":
            assert name in builtin_bigbench_tasks() and spec.bigbench_task == builtin_bigbench_tasks()[name], name
        else:
            assert spec.package in fetch.PACKAGES, name


@pytest.mark.parametrize("name", [n for n, raw in builtin_tasks().items() if raw.get("source") == "hf"])
def test_hub_tasks_match_the_hub_columns(name):
    """The hub dataset's columns, through its row transform, fit the task's template and labels."""
    spec = task_spec({"name": name})
    (example,) = _examples(spec, _transformed(spec, [("row 1", HUB_ROWS[spec.hf])], spec.hf), spec.hf)
    prompt, continuations = spec.render(example.fields), spec.continuations(example)
    assert prompt.strip() and all(c.strip() for c in continuations or ["x"])
    if name == "copa":  # MeZO: "The man broke his toe because" + " he dropped a hammer on his foot."
        assert prompt == "The man broke his toe because"
        assert continuations == [" he dropped a hammer on his foot.", " I got a hole in my sock."]
        assert spec.target(example) == 0
    if name == "record":  # MeZO's GPT-3 template
        assert prompt == "Obama met Merkel.\n- They talked\n-"
        assert continuations == [" Obama spoke first.", " Merkel spoke first."] and spec.target(example) == 1
    if name == "winogrande":  # ZO-Bench: context up to the blank, option + rest of the sentence
        assert prompt == "Sarah beat Maria because"
        assert continuations == [" Sarah trained more.", " Maria trained more."] and spec.target(example) == 0
    if name == "boolq":
        assert prompt == "The sky is blue. Is the sky blue?" and continuations == [" No", " Yes"]
    if name == "wsc":
        assert 'does the pronoun "he" refer to Mark? Yes or No?\n' in prompt
    if name == "squad":
        assert example.answers == ("Shakespeare", "William Shakespeare")
        assert prompt == "Title: Hamlet\nContext: Shakespeare wrote Hamlet.\nQuestion: Who wrote Hamlet?\nAnswer:"
    if name == "drop":
        assert example.answers == ("7",)


def test_row_transforms_drop_unlabelled_rows():
    assert ROW_TRANSFORMS["snli"]({"premise": "p", "hypothesis": "h", "label": -1}) is None
    assert ROW_TRANSFORMS["winogrande"]({"sentence": "_ won.", "option1": "A", "option2": "B", "answer": ""}) is None


def test_listing_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(bigbench, "_fetch_bigbench_members", lambda *a: pytest.fail("listing must not download"))
    rows = {r["name"]: r for r in list_tasks()}
    assert rows["winowhy"]["source"] == ("BIG-bench 1.0.0 sdist (PyPI), fetched at first use "
                                         "(358 MB, streamed; every BIG-bench task at once)")
    assert rows["winowhy"]["train"] is None and rows["rotten_tomatoes"]["test"] is None
    sst2 = rows["sst2"]["source"]
    assert sst2.startswith("HF hub nyu-mll/glue:sst2 (online, or from the local HF cache") and "offline: rotten_tomatoes" in sst2
    assert (rows["squad"]["type"], rows["squad"]["metric"]) == ("generation", "f1")

    from zotune.cli import main

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "type", "metric", "train", "/", "test", "source", "here"]
    copa = next(line for line in lines if line.startswith("copa "))
    assert copa.index("multiple_choice") == lines[0].index("type") and copa.index("HF hub") == lines[0].index("source")


@pytest.fixture(scope="module")
def bigbench_cache():
    """The real BIG-bench data in the user's cache (fetched once if absent: ~360 MB, seconds here)."""
    try:
        return bigbench.fetch_bigbench()
    except DataError as err:
        pytest.skip(f"BIG-bench data not cached and not downloadable here: {err}")


@pytest.mark.parametrize("name", [n for n, raw in builtin_tasks().items()
                                  if str(raw.get("package", "")).startswith("bigbench-")])
def test_offline_bigbench_tasks_load_balanced(bigbench_cache, name):
    data = load_task(task_spec({"name": name}), seed=0)
    spec = data.spec
    assert data.train and data.dev and data.test
    if spec.type == "generation":
        assert len(data.train) == spec.k_shot and len(data.test) == min(spec.n_test, 1600)
        assert all(e.answers[0].strip() and spec.render(e.fields).endswith("\nAnswer:") for e in data.test)
        return
    counts = collections.Counter(e.label for e in data.train)
    if spec.type == "multiple_choice" and len({len(e.candidates) for e in data.train + data.test}) > 1:
        assert len(data.train) == spec.k_shot  # varying candidates: k_shot in all
    else:
        assert set(counts.values()) == {spec.k_shot}, counts  # k_shot of every class (or gold position)
    assert len(counts) >= 2
    test_counts = collections.Counter(e.label for e in data.test)
    assert len(test_counts) == len(counts) and min(test_counts.values()) >= 0.05 * len(data.test), test_counts
    for e in data.train[:5]:
        prompt, continuations = spec.render(e.fields), spec.continuations(e)
        assert prompt.strip() and len(continuations) >= 2 and 0 <= spec.target(e) < len(continuations)


# ---- hub data from local files, the local cache, and a separate test file (through `datasets`) ----

HUB_TASKS = [n for n, raw in builtin_tasks().items() if raw.get("source") == "hf"]


def hub_variants(spec, row: dict) -> list[dict]:
    """Rows in the hub's layout covering every class of a classification task (one row otherwise)."""
    if spec.type != "classification":
        return [row]
    value = row[spec.label_column]
    return [{**row, spec.label_column: type(value)(label)} for label in spec.labels]


def write_hub_folder(folder, splits: dict[str, list[dict]]):
    """A folder laid out as a hub dataset repository: data/<split>-00000-of-00001.parquet."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (folder / "data").mkdir(parents=True)
    for split, rows in splits.items():
        pq.write_table(pa.Table.from_pylist(rows), folder / "data" / f"{split}-00000-of-00001.parquet")
    return folder


def test_every_hub_id_is_a_namespaced_script_free_copy():
    """Bare canonical ids (``super_glue``, ``trec``, ``drop``) are the loading-script datasets that
    `datasets` >= 4 refuses; the built-ins name org/name copies (trec has none: its YAML says so)."""
    for name in HUB_TASKS:
        spec = task_spec({"name": name})
        path, _ = parse_hf(spec.hf)
        assert path.count("/") == 1 and path.split("/")[0] not in MOVED, (name, spec.hf)
    assert parse_hf("super_glue/boolq") == ("aps/super_glue", "boolq")  # older ids still resolve
    assert parse_hf("glue/sst2") == ("nyu-mll/glue", "sst2")
    assert parse_hf("stanfordnlp/snli") == ("stanfordnlp/snli", None)
    assert parse_hf("SetFit/sst5:default") == ("SetFit/sst5", "default")


@pytest.mark.parametrize("name", HUB_TASKS)
def test_hub_tasks_load_offline_from_local_files_in_the_hub_layout(name, tmp_path, monkeypatch, tiny_model_dir):
    """Every built-in hub task: its rows in the hub's own columns, as a local dataset folder, go through
    `datasets`, the task's row transform, the split and the scorer (tiny model) with the hub unreachable."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = task_spec({"name": name})
    rows = hub_variants(spec, HUB_ROWS[spec.hf])
    folder = write_hub_folder(tmp_path / "hub", {"train": rows * 2, spec.hf_split: rows})
    data = load_task(task_spec({"name": name, "hf": str(folder), "k_shot": 1, "n_dev": 0}))
    assert data.train and len(data.test) == len(rows)
    assert all(spec.render(e.fields).strip() for e in data.train + data.test)

    from zotune.models import load_model
    from zotune.train.evaluate import evaluate
    from zotune.train.scoring import make_scorer

    model, tokenizer = load_model(str(tiny_model_dir))
    result = evaluate(model, make_scorer(tokenizer, data.spec, 256, model), data.test, progress=False)
    assert 0.0 <= result.metrics[data.spec.metric] <= 1.0 and len(result.predictions) == len(rows)


def write_hub_cache(cache, repo: str, config: str, splits: dict[str, list[dict]]) -> None:
    """What `datasets` leaves in its cache after loading ``repo``/``config`` from the hub."""
    import shutil

    datasets = pytest.importorskip("datasets")
    from datasets.packaged_modules.parquet.parquet import Parquet

    source = write_hub_folder(cache.parent / "source", splits) / "data"
    files = datasets.data_files.DataFilesDict.from_patterns(
        {split: [str(source / f"{split}-00000-of-00001.parquet")] for split in splits})
    builder = Parquet(cache_dir=str(cache.parent / "build"), dataset_name=repo.split("/")[1], config_name=config,
                      data_files=files)
    builder.download_and_prepare()
    target = cache / repo.replace("/", "___") / config / "0.0.0" / ("0" * 40)
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)


def test_a_cached_hub_dataset_loads_with_the_hub_unreachable(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from zotune import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda *a, **k: False)  # the socket probe fails
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    copa = HUB_ROWS["aps/super_glue:copa"]
    write_hub_cache(tmp_path / "cache", "aps/super_glue", "copa",
                    {"train": [copa, {**copa, "label": 1}] * 2, "validation": [copa]})
    data = load_task(task_spec({"name": "copa", "k_shot": 1, "n_dev": 0}))
    assert len(data.test) == 1 and data.test[0].candidates[0] == "he dropped a hammer on his foot."
    assert datasets.config.HF_HUB_OFFLINE is False  # offline mode only for the load

    with pytest.raises(DataError) as info:  # not in the cache: one line, naming the offline stand-in
        load_task(task_spec({"name": "boolq"}))
    message = str(info.value)
    assert "unreachable" in message and "cache has no copy" in message and "'strategyqa'" in message
    assert "\n" not in message


def test_a_local_file_takes_the_row_transform_and_a_separate_test_file(tmp_path):
    copa = HUB_ROWS["aps/super_glue:copa"]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({**copa, "idx": i, "label": i % 2}) + "\n" for i in range(6)))
    test = write_hub_folder(tmp_path / "t", {"test": [copa] * 3}) / "data" / "test-00000-of-00001.parquet"
    data = load_task(task_spec({"name": "copa", "path": str(train), "test_path": str(test), "k_shot": 2, "n_dev": 1}))
    assert (len(data.train), len(data.dev), len(data.test)) == (4, 2, 3)  # test: the whole file; train/dev: all of path
    assert data.spec.rows == "copa" and data.test[0].fields["connective"] == "because"


@pytest.mark.parametrize("cfg, needle", [
    ({"name": "copa", "rows": "nope"}, "unknown task.rows 'nope'"),
    ({"name": "sst2", "test_path": "x.csv"}, "task.test_path is for a task read from a file"),
])
def test_bad_rows_or_test_path_is_one_line(cfg, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        task_spec(cfg)
    assert "\n" not in str(info.value)


def test_a_file_without_the_transforms_columns_is_one_line(tmp_path):
    bad = tmp_path / "copa.csv"
    bad.write_text("sentence,label\nhello,0\n")
    with pytest.raises(DataError, match=r"line 2: row transform 'copa' needs column 'premise' \(columns: sentence, label\)"):
        load_task(task_spec({"name": "copa", "path": str(bad)}))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_task(task_spec({"name": "copa", "path": str(junk)}))
