"""Config loading: YAML + dotted overrides, defaults, and one-line errors for bad input."""

from __future__ import annotations

import pytest

from zotune.config import CONFIG_VERSION, DEFAULT_NOISE_TABLE_MB, Config, load_config
from zotune.errors import ConfigError


def test_defaults_without_a_file():
    cfg = load_config(None)
    expected = Config(version=CONFIG_VERSION)
    expected.optimizer.noise_table_mb = DEFAULT_NOISE_TABLE_MB  # the current version's fast path
    expected.tuning.lora.freeze_a = True  # and LoRA-FA under ZO
    expected.optimizer.n_queries, expected.optimizer.distribution = 1, "gaussian"  # ZOSGD's own
    assert cfg == expected
    assert cfg.task == {"name": "rotten_tomatoes"}
    assert cfg.optimizer.name == "ZOSGD"


@pytest.mark.parametrize("overrides, table", [
    ([], DEFAULT_NOISE_TABLE_MB),  # new runs: the fast direction path
    (["version=1"], 0.0),  # a run recorded before versions: z drawn per chunk
    (["optimizer.noise_table_mb=0"], 0.0),  # opted out
    (["optimizer.noise_table_mb=128"], 128.0),
    (["optimizer.direction_cache_mb=64"], 0.0),  # the cache excludes the table
    (["optimizer.name=ZOAdam"], DEFAULT_NOISE_TABLE_MB),
    (["optimizer.name=JaguarSignSGD"], 0.0),  # coordinate masks: no table
    (["optimizer.name=AdamW"], 0.0),  # first-order
])
def test_the_noise_table_default_follows_the_config_version(overrides, table):
    assert load_config(None, overrides).optimizer.noise_table_mb == table
    assert load_config(None, overrides, default_version=1).optimizer.noise_table_mb == (
        table if any(o.startswith(("optimizer.noise_table_mb", "version")) for o in overrides) else 0.0)


@pytest.mark.parametrize("overrides, freeze", [
    ([], True),  # new ZO runs: LoRA-FA
    (["version=2"], False),  # recorded before version 3: plain LoRA
    (["optimizer.name=AdamW"], False),  # first-order: plain LoRA
    (["tuning.lora.freeze_a=false"], False),
    (["optimizer.name=AdamW", "tuning.lora.freeze_a=true"], True),
])
def test_lora_fa_is_the_default_for_new_zeroth_order_runs(overrides, freeze):
    assert load_config(None, ["tuning.scheme=lora", *overrides]).tuning.lora.freeze_a is freeze


def test_an_unknown_config_version_is_one_line():
    with pytest.raises(ConfigError, match="'version' must be one of 1, 2, 3"):
        load_config(None, [f"version={CONFIG_VERSION + 1}"])


def test_task_overrides_refine_the_default_task(tmp_path):
    """`zotune train task.k_shot=4`: the default task with k_shot 4, not an inline spec missing its
    template; the same from a config file; a source key still starts a task of its own."""
    from zotune.config import DEFAULT_TASK
    from zotune.tasks import task_spec

    cfg = load_config(None, ["task.k_shot=4"])
    assert cfg.task == {"name": DEFAULT_TASK, "k_shot": 4}
    assert task_spec(cfg.task).name == DEFAULT_TASK
    path = tmp_path / "c.yaml"
    path.write_text("task:\n  k_shot: 4\n")
    assert load_config(path).task == {"name": DEFAULT_TASK, "k_shot": 4}
    assert "name" not in load_config(None, ["task.path=x.csv", "task.k_shot=4"]).task


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptimizer: {name: ZOSGD, lr: 1.0e-6}\ntrain: {steps: 5}\n")
    cfg = load_config(path, ["optimizer.lr=1e-5", "train.batch_size=4", "task.name=rotten_tomatoes", "eval.max_examples=null"])
    assert cfg.seed == 3 and cfg.train.steps == 5 and cfg.train.batch_size == 4
    assert cfg.optimizer.lr == 1e-5
    assert cfg.eval.max_examples is None


@pytest.mark.parametrize("text, value", [("1e-2", 0.01), ("3E+1", 30.0), ("-2.5e-3", -0.0025), ("1.0e-02", 0.01),
                                         ("1e", "1e"), ("e-2", "e-2"), ("'1e-2'", "1e-2"), ("12", 12)])
def test_exponents_without_a_dot_are_numbers(text, value, tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-2 as a text; zotune reads it as YAML 1.2 does, in overrides and files alike, so
    that a grid cell overridden with optimizer.lr=1e-2 is the grid's lr=0.01 cell."""
    from zotune.bench.grid import load_grid
    from zotune.config import parse_override

    assert parse_override(f"x={text}") == ("x", value) and type(parse_override(f"x={text}")[1]) is type(value)
    (tmp_path / "g.yaml").write_text("axes: {optimizer.lr: [1.0e-02, 3.0e-02]}\nbudget: {steps: 2}\n")
    assert [c.name for c in load_grid(tmp_path / "g.yaml", ["optimizer.lr=1e-2"]).cells] == ["lr=0.01"]


def test_inline_task_spec_override(tmp_path):
    cfg = load_config(None, ["task.path=reviews.csv", "task.text_template={text} It was"])
    assert cfg.task["path"] == "reviews.csv" and cfg.task["text_template"] == "{text} It was"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stpes=5", "did you mean 'train.steps'"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("train.steps=0", "train.steps"),
        ("train.steps=2.5", "train.steps"),
        ("train.batch_size=-4", "train.batch_size"),
        ("optimizer.name=ZOSDG", "did you mean 'ZOSGD'"),
        ("optimizer.n_queries=0", "optimizer.n_queries"),
        ("optimizer.distribution=uniform", "optimizer.distribution"),
        ("model.dtype=int8", "model.dtype"),
        ("tuning.scheme=magic", "tuning.scheme"),
        ("eval.zero_shot=maybe", "eval.zero_shot"),
        ("train=5", "must be a section"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_give_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert needle in message and "\n" not in message


@pytest.mark.parametrize(
    "text, needle",
    [
        ("seed: [1, 2\n", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("train: {steps: many}\n", "train.steps"),
    ],
)
def test_bad_files(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(path)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_the_fzoo_recipe_is_the_run_it_reports():
    """configs/recipes/fzoo-full-cosine.yaml is the measured recipe: loaded with seed=1 it resolves to the
    config that benchmarks/convergence.py's fzoo-full-cosine-s1 ran with (archived in docs/convergence/runs),
    every key but the config version (a later version must not change what the recipe means)."""
    import dataclasses
    from pathlib import Path

    import yaml

    root = Path(__file__).parents[1]
    recipe = dataclasses.asdict(load_config(root / "configs/recipes/fzoo-full-cosine.yaml", ["seed=1"]))
    ran = yaml.safe_load((root / "docs/convergence/runs/fzoo-full-cosine-s1/config.yaml").read_text())
    recipe.pop("version"), ran.pop("version")
    assert recipe == ran
