"""Tuning schemes (full / LoRA / prefix / prompt via peft), their scoring, every optimizer on
every scheme, per-scheme defaults, and the half-precision guard. Tiny models, offline."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from zotune import config as config_module
from zotune.config import CONFIG_VERSION, OptimizerConfig, load_config
from zotune.errors import ConfigError
from zotune.models import load_model
from zotune.optim.factory import (
    DEFAULTS_BY_VERSION,
    build_optimizer,
    resolved_hparams,
    run_hparams,
)
from zotune.optim.registry import is_zeroth_order, optimizer_names, zo_class
from zotune.tasks import Example, make_spec
from zotune.train import trainer
from zotune.train.decoding import greedy_decode
from zotune.train.scoring import AnswerScorer, ChoiceScorer, HeadScorer, left_pad
from zotune.train.trainer import run_train
from zotune.tuning import (
    SCHEMES,
    apply_scheme,
    check_precision,
    lora_targets,
    precision_report,
)

ADAPTERS = ("lora", "prefix", "prompt")
SHORT = Example({"text": "fine"}, "1")
LONG = Example({"text": "a much longer sentence than the other one"}, "0")
CHOICES = {"path": "x.csv", "text_template": "{text} It was", "choices": {"0": " bad", "1": " really good"}}


def run_config(model_dir, csv, *extra):
    return load_config(None, [
        f"model.name={model_dir}", f"task.path={csv}", "task.text_template={text} It was",
        'task.choices={"0": " bad", "1": " good"}', "task.k_shot=8", "train.steps=4", "train.batch_size=4",
        "train.log_every=1", "eval.batch_size=8", "eval.max_examples=8", "eval.zero_shot=false", *extra,
    ])


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def tuning(*overrides):
    """A tuning config; LoRA is plain LoRA unless the overrides freeze A (a new ZO config would)."""
    return load_config(None, ["tuning.lora.freeze_a=false", *overrides]).tuning


def schemed(model_dir, scheme, *overrides, dtype="float32", attn=None, jitter=0.0):
    """(model, tokenizer, trainable) of a model directory under a scheme; ``jitter`` moves the
    trainable weights off their initialisation (LoRA starts as the identity)."""
    model, tok = load_model(str(model_dir), dtype=dtype)
    if attn:
        model.set_attn_implementation(attn)
    torch.manual_seed(0)
    model, trainable = apply_scheme(model, tuning(f"tuning.scheme={scheme}", *overrides))
    if jitter:
        with torch.no_grad():
            for p in trainable:
                p.add_(torch.randn_like(p), alpha=jitter)
    return model, tok, trainable


@pytest.fixture(scope="module")
def sharp_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with large random weights: its outputs depend strongly on positions."""
    _, tokenizer = load_model(str(tiny_model_dir))
    path = tmp_path_factory.mktemp("sharp-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.5,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# -- the registry and what each scheme trains ----------------------------------------------
def test_registry_matches_the_config_choices():
    assert set(SCHEMES) == set(config_module.SCHEMES) == {"full", "lora", "prefix", "prompt", "top"}


def test_each_scheme_trains_only_its_parameters(tiny_model_dir):
    # the tiny Llama: hidden 16, 2 layers, 2 heads of 8, 1 key/value head, the tests' small vocabulary
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    expected = {
        "full": vocab * 16 + 2 * (16 * 16 + 2 * 8 * 16 + 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16,
        "lora": 2 * ((8 * 16 + 16 * 8) + (8 * 16 + 8 * 8)),  # r=8 on q_proj (16->16) and v_proj (16->8)
        "prefix": 5 * 2 * 2 * 8,  # 5 virtual tokens x 2 layers x (keys, values) x kv_dim 8
        "prompt": 10 * 16,  # 10 virtual token embeddings
        "top": (16 * 16 + 2 * 8 * 16 + 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16,  # the last layer and the final norm
    }
    for scheme, count in expected.items():
        model, _, trainable = schemed(tiny_model_dir, scheme)
        assert sum(p.numel() for p in trainable) == count, scheme
        if scheme not in ("full", "top"):  # and peft counts the same
            assert model.get_nb_trainable_parameters()[0] == count, scheme
        assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        if scheme == "lora":
            assert all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in names)
        elif scheme == "top":
            assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
        elif scheme != "full":
            assert names == ["prompt_encoder.default.embedding.weight"]


def test_lora_options_reach_peft(tiny_model_dir):
    model, _, trainable = schemed(tiny_model_dir, "lora", "tuning.lora.r=2", "tuning.lora.alpha=4",
                                  "tuning.lora.target_modules=[k_proj, o_proj]")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("k_proj" in n or "o_proj" in n for n in names)
    assert sum(p.numel() for p in trainable) == 2 * ((2 * 16 + 8 * 2) + (2 * 16 + 16 * 2))
    layer = model.base_model.model.model.layers[0].self_attn.k_proj
    assert layer.scaling["default"] == 2.0  # alpha / r
    with pytest.raises(ConfigError, match="tuning.lora.target_modules"):
        schemed(tiny_model_dir, "lora", "tuning.lora.target_modules=nonexistent_proj")


def test_lora_targets_by_architecture():
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    assert lora_targets(llama) == ["q_proj", "v_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    assert lora_targets(gpt2) == ["c_attn"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: Conv1D fan_in_fan_out
        gpt2, trainable = apply_scheme(gpt2, tuning("tuning.scheme=lora"))
    assert trainable and all("c_attn" in n for n, p in gpt2.named_parameters() if p.requires_grad)

    class Unknown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "mamba"})()
            self.in_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match=r"tuning.lora.target_modules is required for model type 'mamba'.*in_proj"):
        apply_scheme(Unknown(), tuning("tuning.scheme=lora"))


def test_prefix_from_real_tokens_is_those_tokens_as_context(sharp_model_dir):
    """init_from_real: the prefix holds the keys/values of n random tokens, so the tuned model
    on x equals the base model on [those tokens, x] (MeZO's initialisation, exactly)."""
    n = 5
    model, tok, _ = schemed(sharp_model_dir, "prefix", "tuning.prefix.init_from_real=true")
    base, _ = load_model(str(sharp_model_dir))
    torch.manual_seed(0)
    tokens = torch.randint(0, base.config.vocab_size, (1, n))  # the draw the scheme made
    x = torch.tensor([tok("a short input")["input_ids"]])
    with torch.no_grad():
        tuned = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        context = base(input_ids=torch.cat((tokens, x), dim=1)).logits[:, n:]
    torch.testing.assert_close(tuned, context, rtol=1e-4, atol=1e-4)


def test_prompt_init_text_uses_the_text_embeddings(tiny_model_dir):
    model, tok, (weight,) = schemed(tiny_model_dir, "prompt", "tuning.prompt.num_virtual_tokens=4",
                                    "tuning.prompt.init_text=great or terrible")
    ids = tok("great or terrible")["input_ids"]
    ids = (ids * 4)[:4]
    torch.testing.assert_close(weight.detach(), model.word_embeddings.weight[ids].detach())


# -- scoring under every scheme ------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scores_do_not_depend_on_padding(sharp_model_dir, scheme, attn):
    """Left padding with explicit positions: an example scores the same alone or padded in a
    batch, under every scheme (peft drops position ids under prompt tuning: zotune passes them)."""
    model, tok, _ = schemed(sharp_model_dir, scheme, attn=attn, jitter=0.5)
    scorer = ChoiceScorer(tok, make_spec(CHOICES))
    with torch.no_grad():
        alone = scorer.scores(model, scorer.encode([SHORT]))
        together = scorer.scores(model, scorer.encode([LONG, SHORT]))
    torch.testing.assert_close(alone[0], together[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_generation_and_head_work_under_every_scheme(sharp_model_dir, scheme):
    model, tok, _ = schemed(sharp_model_dir, scheme, jitter=0.5)
    spec = make_spec({"path": "x.csv", "type": "generation", "text_template": "Q: {text}\nA:",
                      "choice_template": " {choice}", "max_new_tokens": 3})
    answer = AnswerScorer(tok, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. peft ignoring position ids
        alone = answer.generate(model, [SHORT])
        together = answer.generate(model, [LONG, SHORT])
    assert alone[0] == together[1]
    head = HeadScorer(tok, make_spec({**CHOICES, "align": False}), model.config.hidden_size)
    torch.nn.init.normal_(head.head.weight)
    with torch.no_grad():
        a = head.scores(model, head.encode([SHORT]))
        b = head.scores(model, head.encode([LONG, SHORT]))
    torch.testing.assert_close(a[0], b[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_cached_greedy_decoding_equals_argmax_over_full_forwards(sharp_model_dir, scheme):
    """zotune's KV-cached decoder (virtual tokens entered once, one token per step) picks the same
    tokens as the argmax of the scheme's own forward re-run over the whole growing sequence."""
    model, tok, _ = schemed(sharp_model_dir, scheme, jitter=0.5)
    rows = [tok("a much longer prompt than the other")["input_ids"], tok("short")["input_ids"]]
    ids, mask, pos = left_pad(rows, tok.pad_token_id or 0)
    with torch.no_grad():
        cached = greedy_decode(model, ids, mask, pos, 5, lambda new: False)
        for _ in range(5):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids, mask, pos = torch.cat((ids, nxt), 1), torch.cat((mask, torch.ones_like(nxt)), 1), torch.cat((pos, pos[:, -1:] + 1), 1)
    assert cached == ids[:, -5:].tolist()


def test_greedy_decoding_matches_transformers_generate(sharp_model_dir):
    """Without peft in the way, the decoder is the same greedy search as ``model.generate``."""
    model, tok, _ = schemed(sharp_model_dir, "full", jitter=0.5)
    rows = [tok("a much longer prompt than the other")["input_ids"], tok("short")["input_ids"]]
    ids, mask, pos = left_pad(rows, tok.pad_token_id or 0)
    with torch.no_grad():
        ours = greedy_decode(model, ids, mask, pos, 6, lambda new: False)
        theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=6,
                                min_new_tokens=6, pad_token_id=tok.pad_token_id or 0)
    assert ours == theirs[:, ids.shape[1]:].tolist()


# -- training ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ADAPTERS)
@pytest.mark.parametrize("name", optimizer_names())
def test_every_optimizer_trains_every_adapter_scheme(tiny_model_dir, scheme, name):
    """A few steps at the scheme's default hyperparameters: finite losses, the trainable
    parameters move, nothing else does."""
    model, tok, trainable = schemed(tiny_model_dir, scheme, jitter=0.1,
                                    attn="eager" if (zo_class(name) is not None and zo_class(name).needs_forward_ad) else None)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = [p.detach().clone() for p in trainable]
    options = {"coord_fraction": 0.5} if name == "JaguarSignSGD" else {}
    opt = build_optimizer(OptimizerConfig(name=name, options=options), trainable, scheme, seed=0)
    scorer = ChoiceScorer(tok, make_spec(CHOICES))
    batch = scorer.encode([SHORT, LONG])
    for _ in range(3):
        if is_zeroth_order(name):
            loss = float(opt.step(lambda: scorer.loss(model, batch)))
        else:
            opt.zero_grad()
            out = scorer.loss(model, batch)
            out.backward()
            opt.step()
            loss = float(out.detach())
        assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(p, s) for p, s in zip(trainable, start))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_full_scheme_still_trains_everything(tiny_model_dir):
    model, tok, trainable = schemed(tiny_model_dir, "full")
    assert len(trainable) == len(list(model.parameters()))
    scorer = ChoiceScorer(tok, make_spec(CHOICES))
    batch = scorer.encode([SHORT, LONG])
    opt = build_optimizer(OptimizerConfig(name="ZOSGD", lr=1e-3), trainable, "full", seed=0)
    start = [p.detach().clone() for p in trainable]
    assert torch.isfinite(opt.step(lambda: scorer.loss(model, batch)))
    assert all(not torch.equal(p, s) for p, s in zip(trainable, start))


def _capture_sessions(monkeypatch):
    """Keep every Session the trainer builds, with a copy of its frozen weights at build time."""
    sessions = []
    build = trainer.Session.build.__func__

    def spy(cls, *args, **kwargs):
        session = build(cls, *args, **kwargs)
        frozen = {n: p.detach().clone() for n, p in session.model.named_parameters() if not p.requires_grad}
        start = {id(p): p.detach().clone() for p in session.trainable}
        sessions.append((session, frozen, start))
        return session

    monkeypatch.setattr(trainer.Session, "build", classmethod(spy))
    return sessions


def test_zo_lora_run_leaves_the_base_weights_bit_identical(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    sessions = _capture_sessions(monkeypatch)
    summary = run_train(run_config(tiny_model_dir, reviews_csv, "tuning.scheme=lora", "optimizer.lr=1e-2",
                                   "train.eval_every=0"), tmp_path / "run", log=lambda *_: None)
    ((session, frozen, start),) = sessions
    model = session.model
    assert len(frozen) == len(list(model.get_base_model().parameters())) - len(session.trainable)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, start[id(p)]) for p in session.trainable)
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert summary["lr"] == 1e-2 and summary["eps"] == 1e-2  # eps: LoRA's default


def test_mezo_defaults_per_scheme_under_versions_1_and_2():
    """Runs recorded before version 3 keep MeZO's published values (they resume and replay)."""
    for version in (1, 2):
        zo = OptimizerConfig(name="ZOSGD")
        assert resolved_hparams(zo, "full", version) == (1e-6, 1e-3)
        assert resolved_hparams(zo, "lora", version) == (5e-5, 1e-2)
        assert resolved_hparams(zo, "prefix", version) == (1e-2, 1e-1)
        assert resolved_hparams(zo, "prompt", version) == (1e-3, 1e-2)
        assert resolved_hparams(OptimizerConfig(name="ZOAdam"), "full", version) == (1e-5, 1e-3)
        adamw = OptimizerConfig(name="AdamW")
        assert [resolved_hparams(adamw, s, version)[0] for s in ("full", "lora", "prefix", "prompt")] == [
            1e-5, 1e-4, 1e-2, 1e-3]


def test_measured_defaults_for_new_runs():
    """Version 3 (new runs): the sweeps' picks on the default model (docs/sweeps.md)."""
    zo = OptimizerConfig(name="ZOSGD")
    assert resolved_hparams(zo, "full") == resolved_hparams(zo, "full", CONFIG_VERSION) == (1e-4, 1e-3)
    assert resolved_hparams(zo, "lora") == (1e-3, 1e-2)  # plain LoRA: 3e-3 diverges after ~150 steps
    assert resolved_hparams(zo, "lora-fa", 18) == (3e-2, 1e-2)  # LoRA-FA: stable at 10x
    assert resolved_hparams(zo, "lora-fa") == (1e-2, 1e-2)  # 19: its own, measured at 675 steps on three seeds
    assert resolved_hparams(zo, "top") == (1e-3, 1e-3)
    # a new ZO LoRA run is LoRA-FA at its lr; a first-order one, or one recorded under version 2, is plain LoRA
    assert run_hparams(load_config(None, ["tuning.scheme=lora"])) == (1e-2, 1e-2)
    assert run_hparams(load_config(None, ["tuning.scheme=lora", "version=18"])) == (3e-2, 1e-2)
    assert run_hparams(load_config(None, ["tuning.scheme=lora", "tuning.lora.freeze_a=false"])) == (1e-3, 1e-2)
    assert run_hparams(load_config(None, ["tuning.scheme=lora", "version=2"])) == (5e-5, 1e-2)
    assert run_hparams(load_config(None, ["tuning.scheme=lora", "optimizer.name=AdamW"])) == (1e-4, None)
    assert resolved_hparams(OptimizerConfig(name="SGD"), "full") == (1e-3, None)
    # version 4: FZOO's own lr on full fine-tuning (its sweep); a version-3 FZOO run keeps the family's
    assert resolved_hparams(OptimizerConfig(name="FZOO"), "full") == (3e-3, 1e-3)
    assert resolved_hparams(OptimizerConfig(name="FZOO"), "full", 3) == (1e-4, 1e-3)
    assert resolved_hparams(OptimizerConfig(name="FZOO"), "lora-fa", 9) == (1e-1, 1e-2)  # version 9: its LoRA-FA sweep
    assert resolved_hparams(OptimizerConfig(name="FZOO"), "lora-fa") == (3e-2, 1e-2)  # 18: measured at the grid's length
    assert resolved_hparams(OptimizerConfig(name="FZOO"), "lora-fa", 8) == (3e-2, 1e-2)
    assert resolved_hparams(OptimizerConfig(name="ZOSGD", lr=3e-4, eps=5e-3), "lora") == (3e-4, 5e-3)  # given wins
    for version in DEFAULTS_BY_VERSION:  # every optimizer has a default for every scheme, in every version
        for scheme in [*SCHEMES, "lora-fa"]:
            for name in optimizer_names():
                assert resolved_hparams(OptimizerConfig(name=name), scheme, version)[0] > 0


# -- configuration -------------------------------------------------------------------------
def test_scheme_options_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tuning:\n  scheme: lora\n  lora: {r: 4, target_modules: [q_proj, k_proj]}\n")
    cfg = load_config(path, ["tuning.prefix.num_virtual_tokens=7", "tuning.trainable_dtype=float32"])
    assert cfg.tuning.lora.r == 4 and cfg.tuning.lora.alpha == 16 and cfg.tuning.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.tuning.prefix.num_virtual_tokens == 7 and cfg.tuning.prompt.num_virtual_tokens == 10
    assert load_config(None, ["tuning.lora.target_modules=q_proj,v_proj"]).tuning.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(None).tuning.lora.target_modules is None


@pytest.mark.parametrize("override, needle", [
    ("tuning.scheme=adapters", "tuning.scheme"),
    ("tuning.lora.r=0", "tuning.lora.r"),
    ("tuning.lora.alpha=-1", "tuning.lora.alpha"),
    ("tuning.lora.dropout=1.5", "tuning.lora.dropout"),
    ("tuning.lora.target_modules=[]", "tuning.lora.target_modules"),
    ("tuning.lora.rank=8", "unknown config key 'tuning.lora.rank'"),
    ("tuning.prefix.num_virtual_tokens=0", "tuning.prefix.num_virtual_tokens"),
    ("tuning.prompt.num_virtual_tokens=0", "tuning.prompt.num_virtual_tokens"),
    ("tuning.prompt.init_text=' '", "tuning.prompt.init_text"),
    ("tuning.trainable_dtype=int8", "tuning.trainable_dtype"),
    ("tuning.trainable_dtype=float32", "tuning.trainable_dtype' applies to the adapter schemes"),
    ("tuning.precision_check=maybe", "tuning.precision_check"),
])
def test_bad_tuning_values_give_one_clear_line(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value) and "\n" not in str(info.value)


# -- precision -----------------------------------------------------------------------------
def guard_config(*overrides):
    return load_config(None, ["optimizer.eps=1e-3", "optimizer.lr=1e-6", *overrides])


def test_guard_catches_a_perturbation_that_rounds_away():
    """float16 weights of magnitude 1000 have an ulp of 0.5: w + 1e-3 * z == w everywhere."""
    big = torch.full((64, 64), 1000.0).add_(torch.rand(64, 64))
    report = precision_report([big.half()], eps=1e-3, step=None)
    assert report.probe_lost == 1.0 and report.dtypes == ["float16"]
    with pytest.raises(ConfigError, match=r"not perturb 100%.*model.dtype=float32") as info:
        check_precision(guard_config(), [big.half()], closure=None)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="tuning.trainable_dtype=float32"):
        check_precision(guard_config("tuning.scheme=lora"), [big.bfloat16()], closure=None)
    assert precision_report([big], eps=1e-3, step=None) is None  # float32: nothing to check
    assert check_precision(guard_config(), [big], closure=None) is None
    assert check_precision(guard_config("optimizer.name=AdamW"), [big.half()], closure=None) is None
    assert check_precision(guard_config("tuning.precision_check=ignore"), [big.half()], closure=None) is None
    lines = []
    report = check_precision(guard_config("tuning.precision_check=warn"), [big.half()], None, log=lines.append)
    assert report.probe_lost == 1.0 and lines[0].startswith("WARNING: ") and "trainable" in lines[0]


def test_guard_catches_an_update_that_rounds_away():
    w = torch.rand(256, 64).add_(0.5).half()  # ulp 2^-10 .. 2^-11
    report = precision_report([w], eps=1e-2, step=1e-6)
    assert report.probe_lost < 0.1 and report.update_lost > 0.99
    assert precision_report([w], eps=1e-2, step=1e-1).update_lost < 0.1
    # a sign rule steps by lr whatever g is: no forward needed to see lr=1e-6 vanish
    with pytest.raises(ConfigError, match=r"leave 100% .* unchanged"):
        check_precision(guard_config("optimizer.name=ZOSGDSign", "optimizer.eps=1e-2"), [w], closure=None)
    # SGD: lr * |g|, with g measured by SPSA probes of the closure
    calls = []

    def closure():
        calls.append(1)
        return (w.float() * 1e3).sum()  # |g| = 1e3 * |sum z|: the step 1e-6 * |g| is large enough

    assert check_precision(guard_config("optimizer.eps=1e-2"), [w], closure).update_lost < 0.5
    assert len(calls) == 4  # 2 queries x 2 probes


def test_guard_sizes_an_orthogonalised_step_by_its_entries():
    """ZO-Muon moves an entry of an m x n matrix by far less than lr: in a rank-8 subspace, lr * sqrt(8 / (m n)).
    At lr 0.1 on bfloat16 weights near 1, a sign rule's step registers; ZO-Muon's (about 2e-3) mostly does not."""
    w = torch.rand(256, 64).add_(0.5).bfloat16()
    settings = ("optimizer.eps=1", "optimizer.lr=0.1")
    assert check_precision(guard_config("optimizer.name=ZOSGDSign", *settings), [w], closure=None).update_lost < 0.1
    with pytest.raises(ConfigError, match=r"leave [5-9]\d% .* about 0.0022\*z per coordinate"):
        check_precision(guard_config("optimizer.name=ZOMuon", "optimizer.options={rank: 8}", *settings), [w], closure=None)
    full_rank = check_precision(guard_config("optimizer.name=ZOMuon", "optimizer.options={rank: null}", *settings), [w],
                                closure=None)  # entries of about lr / sqrt(256) * 2
    assert 0.1 < full_rank.update_lost < 0.5 and full_rank.step == pytest.approx(0.1 * 2 / 16)


def test_guard_stops_a_collapsing_half_precision_run(tiny_model_dir, reviews_csv, tmp_path):
    with pytest.raises(ConfigError, match="would leave .* unchanged"):
        run_train(run_config(tiny_model_dir, reviews_csv, "model.dtype=float16", "optimizer.lr=1e-9"),
                  tmp_path / "run", log=lambda *_: None)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lora_adapters_in_float32_over_a_half_precision_base(tiny_model_dir, reviews_csv, tmp_path, monkeypatch, dtype):
    sessions = _capture_sessions(monkeypatch)
    lines = []
    run_train(run_config(tiny_model_dir, reviews_csv, f"model.dtype={dtype}", "tuning.scheme=lora",
                         "tuning.lora.freeze_a=false", "tuning.trainable_dtype=float32", "train.eval_every=0"),
              tmp_path / "run", log=lines.append)
    ((session, frozen, start),) = sessions
    assert {p.dtype for p in session.trainable} == {torch.float32}
    assert {p.dtype for p in frozen.values()} == {getattr(torch, dtype)}
    assert all(torch.equal(p, frozen[n]) for n, p in session.model.named_parameters() if n in frozen)
    assert any(not torch.equal(p, start[id(p)]) for p in session.trainable)
    losses = [m["loss"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert not any("WARNING" in str(line) for line in lines)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 0


def test_lora_fa_tunes_only_b_and_keeps_a_at_its_init(tiny_model_dir, reviews_csv, tmp_path, monkeypatch):
    """LoRA-FA (``tuning.lora.freeze_a``), over a bfloat16 base with float32 adapters: only the
    B matrices train; every A stays bit-identical, in the adapters' dtype (peft feeds A's output
    to B)."""
    sessions = _capture_sessions(monkeypatch)
    run_train(run_config(tiny_model_dir, reviews_csv, "model.dtype=bfloat16", "tuning.scheme=lora",
                         "tuning.lora.freeze_a=true", "tuning.trainable_dtype=float32", "optimizer.lr=1e-2",
                         "train.eval_every=0"), tmp_path / "run", log=lambda *_: None)
    ((session, frozen, start),) = sessions
    named = dict(session.model.named_parameters())
    a = [n for n in named if ".lora_A." in n]
    assert a and all(n in frozen and torch.equal(named[n], frozen[n]) for n in a)
    assert {named[n].dtype for n in a} == {p.dtype for p in session.trainable} == {torch.float32}
    assert {n for n, p in named.items() if p.requires_grad} == {n for n in named if ".lora_B." in n}
    assert all(not torch.equal(p, start[id(p)]) for p in session.trainable)


# -- the top scheme and its frozen-prefix activation cache ---------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2_dir(tiny_model_dir, tmp_path_factory):
    """A 2-layer GPT-2 (learned positions: not a frozen-prefix architecture) with the embedded tokenizer."""
    _, tokenizer = load_model(str(tiny_model_dir))
    path = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=256,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_top_scheme_trains_the_top_layers_and_the_final_norm(tiny_model_dir):
    model, _, trainable = schemed(tiny_model_dir, "top", "tuning.top.layers=1")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.1.", "model.norm.")) for n in names)
    assert "model.norm.weight" in names and len(trainable) == len(names)
    with pytest.raises(ConfigError, match="tuning.top.layers is 3, but the model has 2 layers"):
        schemed(tiny_model_dir, "top", "tuning.top.layers=3")


def test_frozen_prefix_probes_equal_full_forwards(sharp_model_dir):
    """One example: the cached forward is the full forward bit for bit, so a ZOSGD step through
    the cache moves the weights exactly as through the model; a padded batch: equal up to float
    rounding. The cache holds each training example once. The one example's candidates are one token
    each (no padding), and its label is the choice the sharp model finds less likely (its loss as a
    label the model is sure of can be exactly 0)."""
    from zotune.tuning.frozen_prefix import FrozenPrefix

    model, tok, trainable = schemed(sharp_model_dir, "top", "tuning.top.layers=1")
    probe = FrozenPrefix(model, start=1)
    scorer = ChoiceScorer(tok, make_spec({**CHOICES, "choices": {"0": " bad", "1": " good"}}))
    with torch.no_grad():
        one = max((scorer.encode([Example(LONG.fields, label)]) for label in CHOICES["choices"]),
                  key=lambda batch: scorer.loss(model, batch).item())
        assert scorer.loss(model, one) > 0
    both = scorer.encode([LONG, SHORT])
    with torch.no_grad():
        assert torch.equal(scorer.loss(probe, one), scorer.loss(model, one))
        torch.testing.assert_close(scorer.loss(probe, both), scorer.loss(model, both), rtol=1e-5, atol=1e-6)
    start = [p.detach().clone() for p in trainable]
    after = []
    for forward in (model, probe):
        with torch.no_grad():
            for p, s in zip(trainable, start):
                p.copy_(s)
        opt = build_optimizer(OptimizerConfig(name="ZOSGD", lr=1e-2, eps=1e-2), trainable, "top", seed=0)
        for _ in range(3):
            opt.step(lambda: scorer.loss(forward, one))
        after.append([p.detach().clone() for p in trainable])
    assert all(torch.equal(a, b) for a, b in zip(*after)) and any(not torch.equal(a, s) for a, s in zip(after[0], start))
    assert len(probe.cache) == 2 and probe.cache_bytes > 0  # a row per example: one-token candidates share it


def test_top_scheme_run_reports_its_cache_and_a_gpt2_runs_uncached(tiny_model_dir, tiny_gpt2_dir, reviews_csv, tmp_path):
    lines = []
    summary = run_train(run_config(tiny_model_dir, reviews_csv, "tuning.scheme=top", "optimizer.lr=1e-3"),
                        tmp_path / "llama", log=lines.append)
    assert summary["activation_cache_mb"] > 0
    summary = run_train(run_config(tiny_gpt2_dir, reviews_csv, "tuning.scheme=top", "optimizer.lr=1e-3"),
                        tmp_path / "gpt2", log=lines.append)
    assert "activation_cache_mb" not in summary
    assert any("no activation cache for model type 'gpt2'" in line for line in lines)


# -- OPT, the papers' model family ---------------------------------------------------------------
@pytest.mark.parametrize("scheme", [*SCHEMES])
@pytest.mark.parametrize("optimizer", ["ZOSGD", "AdamW"])
def test_a_tiny_opt_trains_under_every_scheme(tiny_opt_dir, reviews_csv, tmp_path, scheme, optimizer):
    """OPT (learned positions, q/k/v/out_proj, dropout 0.1 in its config) through every scheme with a ZO and
    an FO optimizer: the default LoRA targets, prefix (its past key/values), prompt, top; the trainable
    parameters move, the frozen ones do not."""
    cfg = run_config(tiny_opt_dir, reviews_csv, f"tuning.scheme={scheme}", f"optimizer.name={optimizer}",
                     "optimizer.lr=1e-2", "train.steps=2")
    model, _ = load_model(str(tiny_opt_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = run_train(cfg, tmp_path / "run", log=lambda *_: None)
    assert summary["steps"] == 2 and 0.0 <= summary["eval"]["accuracy"] <= 1.0
    if scheme == "lora":
        peft_model, trainable = apply_scheme(model, cfg.tuning)
        names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
        assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    if scheme == "full":
        from safetensors.torch import load_file

        after = load_file(tmp_path / "run" / "weights.safetensors")
        moved = [n for n, t in after.items() if n in before and not torch.equal(t, before[n])]
        assert moved
