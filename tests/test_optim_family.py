"""Every ZO optimizer: learns a small seeded problem, keeps the contract guarantees."""

from __future__ import annotations

import copy

import pytest
import torch

from zotune.config import load_config
from zotune.errors import ConfigError
from zotune.optim import (FZOO, LOZO, ZOSGD, HiZOO, ForwardGrad, JaguarSignSGD, SparseMeZO, ZOAdam, ZOMuon, ZOMuonSubspace,
                          ZOSGDConservative, ZOSGDMomentum,
                          ZOSGDSign, newton_schulz)
from zotune.optim.factory import build_optimizer
from zotune.optim.newton_schulz import _iterate

from .conftest import tiny_llama

class Jaguar30(JaguarSignSGD, register=False):
    """Sign-JAGUAR drawing 30% of the coordinates per step (the default 1% suits LLMs)."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr, coord_fraction=0.3, **kwargs)


class Sparse20(SparseMeZO, register=False):
    """Sparse-MeZO leaving out the largest 20% (on a 10-weight regression from zero, where the large
    weights are the ones still to grow; pretrained LLM weights are its setting)."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr, sparsity=0.2, **kwargs)


class MuonSubspace(ZOMuonSubspace, register=False):
    """ZO-Muon in a rank-2 subspace redrawn every 2 steps, with momentum, two-sided (the regression's 1 x 10
    weight is no larger than the rank: its dense full-rank rule; the tiny model's matrices take the subspace rule)."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr, rank=2, refresh=2, momentum=0.9, one_sided=False, **kwargs)


class MuonSpectral(ZOMuon, register=False):
    """ZO-Muon with Newton-Schulz in its spectral form (config version 24's on full fine-tuning on a CPU)."""

    def __init__(self, params, lr, **kwargs):
        super().__init__(params, lr, ns_form="spectral", **kwargs)


# (class, lr) chosen so that 300 steps make clear progress on the regression below
FAMILY = [(ZOSGD, 2e-3), (ZOSGDSign, 1e-2), (ZOSGDMomentum, 5e-4), (ZOSGDConservative, 2e-3), (ZOAdam, 1e-2), (ForwardGrad, 2e-3), (Jaguar30, 1e-2), (ZOMuon, 2e-2), (MuonSpectral, 2e-2),
          (MuonSubspace, 2e-2), (Sparse20, 2e-3), (FZOO, 3e-3), (HiZOO, 2e-3), (LOZO, 2e-3)]
IDS = [cls.__name__ for cls, _ in FAMILY]


def prepared(model, cls):
    if getattr(cls, "needs_forward_ad", False):
        model.set_attn_implementation("eager")
    return model


def regression(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, w_true = torch.randn(64, 10, generator=g), torch.randn(10, 1, generator=g)
    y = x @ w_true
    model = torch.nn.Linear(10, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model, (lambda: ((model(x) - y) ** 2).mean())


@pytest.mark.parametrize("cls, lr", FAMILY, ids=IDS)
def test_reduces_the_loss_of_a_seeded_problem(cls, lr):
    model, loss = regression()
    start = float(loss().detach())
    opt = cls(model.parameters(), lr=lr, eps=1e-3, seed=0, n_queries=2)
    for _ in range(300):
        opt.step(loss)
    assert float(loss().detach()) < 0.3 * start


@pytest.mark.parametrize("cls, lr", FAMILY, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lr_zero_and_state_dict_continuation(cls, lr, dtype, tiny_batch):
    model = prepared(tiny_llama(dtype), cls)
    before = [p.detach().clone() for p in model.parameters()]
    opt0 = cls(model.parameters(), lr=0.0, eps=1e-2)
    for _ in range(2):
        opt0.step(lambda: model(**tiny_batch).loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    opt = cls(model.parameters(), lr=lr, eps=1e-2, seed=4)
    closure = lambda: model(**tiny_batch).loss  # noqa: E731
    for _ in range(2):
        opt.step(closure)
    weights, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())
    for _ in range(2):
        opt.step(closure)
    expected = [p.detach().clone() for p in model.parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(weights, expected)), "steps must move the weights"

    other = prepared(tiny_llama(dtype), cls)
    with torch.no_grad():
        for p, w in zip(other.parameters(), weights):
            p.copy_(w)
    opt2 = cls(other.parameters(), lr=lr, eps=1e-2, seed=0)
    opt2.load_state_dict(state)
    for _ in range(2):
        opt2.step(lambda: other(**tiny_batch).loss)
    assert all(torch.equal(a, b) for a, b in zip(expected, other.parameters()))


def test_sign_moves_every_coordinate_by_lr():
    w = torch.nn.Parameter(torch.zeros(100))
    target = torch.randn(100)
    opt = ZOSGDSign([w], lr=0.25, eps=1e-3)
    opt.step(lambda: ((w - target) ** 2).sum())
    assert set(w.detach().abs().unique().tolist()) == {0.25}


def test_momentum_and_adam_keep_float32_state():
    w = torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))
    for cls, names in ((ZOSGDMomentum, ["momentum_buffer"]), (ZOAdam, ["exp_avg", "exp_avg_sq"])):
        opt = cls([w], lr=1e-3)
        opt.step(lambda: (w.float() ** 2).sum() + w.float().sum())
        assert [opt.state[w][n].dtype for n in names] == [torch.float32] * len(names)


@pytest.mark.parametrize("kwargs", [dict(momentum=1.0), dict(momentum=-0.1)])
def test_momentum_validation(kwargs):
    with pytest.raises(ValueError, match="momentum"):
        ZOSGDMomentum([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, **kwargs)


def test_adam_validation():
    with pytest.raises(ValueError, match="betas"):
        ZOAdam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(1.0, 0.9))


def test_factory_builds_each_by_name_with_options():
    model = torch.nn.Linear(2, 1)
    for name in ("ZOSGD", "ZOSGDSign", "ZOSGDMomentum", "ZOSGDConservative", "ZOAdam", "ForwardGrad", "JaguarSignSGD", "ZOMuon",
                 "ZOMuonSubspace", "SparseMeZO", "FZOO", "HiZOO", "LOZO", "SGD", "AdamW"):
        cfg = load_config(None, [f"optimizer.name={name}"]).optimizer
        assert type(build_optimizer(cfg, model.parameters(), "full", seed=0)).__name__ == name
    cfg = load_config(None, ["optimizer.name=ZOSGDMomentum", "optimizer.options={momentum: 0.5}"]).optimizer
    assert build_optimizer(cfg, model.parameters(), "full", seed=0).param_groups[0]["momentum"] == 0.5
    bad = load_config(None, ["optimizer.name=ZOSGD", "optimizer.options={colour: 1}"]).optimizer
    with pytest.raises(ConfigError, match="colour"):
        build_optimizer(bad, model.parameters(), "full", seed=0)


@pytest.mark.parametrize("n_queries", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conservative_never_accepts_a_worse_loss(n_queries, dtype, tiny_batch):
    """Each step's batch loss is <= the loss before it, and an accepted candidate's evaluated
    loss is exactly the loss at the new weights (the candidates are bit-exact)."""
    model = tiny_llama(dtype)
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return model(**tiny_batch).loss

    opt = ZOSGDConservative(model.parameters(), lr=0.03, eps=1e-2, n_queries=n_queries)  # large: some rejections
    seen = set()
    for _ in range(8):
        with torch.no_grad():
            before = float(closure())
        calls["n"] = 0
        opt.step(closure)
        assert calls["n"] == opt.forwards_per_step == 2 * n_queries + 3
        with torch.no_grad():
            after = float(closure())
        extra = opt.last_record.extra
        seen.add(extra["accepted"])
        assert after <= before
        f0, f_minus, f_plus = extra["candidate_losses"]
        assert f0 == before
        assert after == {0: f0, -1: f_minus, 1: f_plus}[extra["accepted"]]
    assert len(seen) > 1, "the test should see both accepted and rejected steps"


def test_conservative_rejects_weight_decay():
    with pytest.raises(ValueError, match="weight_decay"):
        ZOSGDConservative([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.1)


@pytest.mark.parametrize("form", ["iterative", "spectral"])
@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48), (200, 8)])
def test_newton_schulz_pushes_singular_values_towards_one(shape, form):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5.0
    o = newton_schulz(g, form=form)
    assert o.shape == g.shape and o.dtype == torch.float32
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25, s
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh  # the exact orthogonal factor: NS must point the same way
    cos = float((o * polar).sum() / (o.norm() * polar.norm()))
    assert cos > 0.95


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        newton_schulz(torch.ones(5))
    with pytest.raises(ValueError, match="form must be one of iterative, spectral, auto"):
        newton_schulz(torch.ones(2, 2), form="svd")


def newton_schulz_float64(m: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration in float64: the reference both float32 forms are held to."""
    x = m.double() / m.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = _iterate(x.T if tall else x, steps)
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (192, 576), (64, 64)])
def test_spectral_newton_schulz_is_the_iteration_in_closed_form(shape):
    """The spectral form applies the iteration's polynomial to the singular values: the same matrix as the
    five iterations in float64, to float32 precision (the float32 iteration's own error is 2e-6 - 7e-5 of the
    largest entry here; the map itself only brings singular values into [0.7, 1.2]), on random matrices of the
    default model's shapes and on a rank-4 one; "auto" is the spectral form on a CPU."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    low_rank = torch.randn(shape[0], 4, generator=torch.Generator().manual_seed(2)) @ torch.randn(4, shape[1])
    for m in (g, low_rank):
        reference = newton_schulz_float64(m)
        spectral = newton_schulz(m, form="spectral")
        assert spectral.dtype == torch.float32 and spectral.shape == m.shape
        error, iteration_error = (float((o.double() - reference).abs().max() / reference.abs().max())
                                  for o in (spectral, newton_schulz(m)))
        assert error < 5e-4, (error, iteration_error)
        assert torch.equal(newton_schulz(m, form="auto"), spectral)
    assert not torch.equal(newton_schulz(g, form="spectral"), newton_schulz(g))  # another code path


def test_spectral_newton_schulz_carries_a_nan_on():
    """A diverged run's momentum (NaN or inf) gives a NaN step, as the iteration does, not an eigh error."""
    for bad in (float("nan"), float("inf")):
        m = torch.ones(4, 6)
        m[1, 2] = bad
        assert newton_schulz(m, form="spectral").isnan().all()


def test_a_state_dict_saved_before_an_option_existed_loads():
    """ZO-Muon's groups gained ``ns_form``: a state saved without it resumes with the value the optimizer was
    built with, and the continuation is the same as that of a state that had it."""
    w = torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    loss = lambda: (w ** 2).sum()  # noqa: E731
    opt = ZOMuon([w], lr=1e-2, seed=1, ns_form="spectral")
    opt.step(loss)
    saved = opt.state_dict()
    old = {**saved, "param_groups": [{k: v for k, v in g.items() if k != "ns_form"} for g in saved["param_groups"]]}
    start = w.detach().clone()
    results = []
    for state in (saved, old):
        w.data.copy_(start)
        resumed = ZOMuon([w], lr=1e-2, seed=1, ns_form="spectral")
        resumed.load_state_dict(state)
        assert resumed.param_groups[0]["ns_form"] == "spectral"
        resumed.step(loss)
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_muon_matrix_step_has_unit_spectral_scale():
    """The estimate g * z (z a random matrix) becomes a step whose singular values are all
    about lr * scale, whatever the size of g."""
    w = torch.nn.Parameter(torch.zeros(16, 8))
    b = torch.nn.Parameter(torch.zeros(8))
    target = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)) * 100
    opt = ZOMuon([w, b], lr=0.1, eps=1e-3)
    opt.step(lambda: ((w - target) ** 2).sum() + (b ** 2).sum())
    s = torch.linalg.svdvals(w.detach())
    scale = 2 ** 0.5  # 16 x 8: sqrt(rows / cols)
    assert float(s.min()) > 0.1 * scale * 0.6 and float(s.max()) < 0.1 * scale * 1.25


def test_muon_keeps_embeddings_out_of_newton_schulz(tiny_batch):
    """Muon's rule: hidden matrices are orthogonalised; the (tied) token embedding is not: it
    takes the plain momentum step, which equals ZOSGDMomentum's on the same seed."""
    model = tiny_llama()
    groups = ZOMuon.param_groups_for(model, list(model.parameters()))
    embedding = model.get_input_embeddings().weight
    assert [g.get("orthogonalize", True) for g in groups] == [True, False]
    assert groups[1]["params"] == [embedding] and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    reference = tiny_llama()
    muon = ZOMuon(groups, lr=1e-2, momentum=0.9, seed=3)
    mmt = ZOSGDMomentum(ZOMuon.param_groups_for(reference, list(reference.parameters())), lr=1e-2, momentum=0.9, seed=3)
    muon.step(lambda: model(**tiny_batch).loss)
    mmt.step(lambda: reference(**tiny_batch).loss)
    # the same groups, so the same probes: only the update rule of the hidden matrices differs
    assert torch.equal(embedding, reference.get_input_embeddings().weight)
    q, q_ref = model.model.layers[0].self_attn.q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q, q_ref)
    # plain_lr: the momentum-step parameters' own lr (0 here: only hidden matrices move)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain0 = ZOMuon(ZOMuon.param_groups_for(model, list(model.parameters())), lr=1e-2, plain_lr=0.0, seed=4)
    plain0.step(lambda: model(**tiny_batch).loss)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.ndim == 2 and p is not embedding}


def test_forward_grad_jvp_is_exact(tiny_batch):
    """The recorded projected gradient is grad f . z, checked against a backward pass."""
    from zotune.estimators import DirectionSampler
    from zotune.estimators.spsa import direction_key

    model = prepared(tiny_llama(), ForwardGrad)
    opt = ForwardGrad(model.parameters(), lr=0.0)
    opt.step(lambda: model(**tiny_batch).loss)
    model.zero_grad()
    model(**tiny_batch).loss.backward()
    sampler, seed = DirectionSampler("gaussian"), opt.last_record.query_seeds[0]
    expected = sum(
        float((p.grad.view(-1) * sampler.full(p.numel(), direction_key(seed, i))).sum())
        for i, p in enumerate(model.parameters())
    )
    assert opt.last_record.projected_grads[0] == pytest.approx(expected, rel=1e-4)


def test_forward_grad_is_unbiased_and_converges_with_queries():
    torch.manual_seed(0)
    d = 8
    a = torch.randn(d, d)
    a = a @ a.T / d + torch.eye(d)
    x = torch.nn.Parameter(torch.randn(d))
    true = (a @ x.detach()).clone()
    f = lambda: 0.5 * x @ a @ x  # noqa: E731
    from zotune.estimators.forward_grad import ForwardGradient

    def mean_estimate(n_queries, steps):
        est = ForwardGradient(n_queries=n_queries)
        total = torch.zeros(d)
        with torch.no_grad():
            for s in range(steps):
                total += est.estimate(f, [x], [0], step_seed=s).materialize(0, torch.empty(d))
        return total / steps

    cos = torch.nn.functional.cosine_similarity
    assert float(cos(mean_estimate(1, 2000), true, dim=0)) > 0.95  # unbiased: the average aligns
    one = mean_estimate(1, 1)
    many = mean_estimate(3000, 1)  # one step, many queries: approaches the true gradient
    assert float((many - true).norm() / true.norm()) < 0.1 < float((one - true).norm() / true.norm())


def test_forward_grad_names_the_fix_for_ops_without_forward_ad(tiny_batch):
    model = tiny_llama()  # SDPA attention: no forward-AD rule on CPU
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NotImplementedError, match="eager"):
        ForwardGrad(model.parameters(), lr=1e-2).step(lambda: model(**tiny_batch).loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_jaguar_probes_touch_only_the_chosen_coordinates():
    from zotune.estimators.directions import mix
    from zotune.estimators.spsa import direction_key, query_seeds

    w = torch.nn.Parameter(torch.randn(3000))
    tau, seen = 0.5, []
    opt = JaguarSignSGD([w], lr=1e-3, eps=tau, coord_fraction=0.05, seed=9)
    original = w.detach().clone()  # not a parameter: reads as itself inside the probes
    opt.step(lambda: (seen.append((w + 0).detach() - original), (w ** 2).sum())[1])
    mask = opt.estimator.sampler.full(3000, direction_key(query_seeds(mix(9, 0), 1)[0], 0)).bool()
    assert 0.02 < float(mask.float().mean()) < 0.08
    for diff in seen:  # the + and - probes
        assert torch.equal(diff != 0, mask)
        torch.testing.assert_close(diff[mask].abs(), torch.full((int(mask.sum()),), tau), rtol=0, atol=1e-5)
    memory = opt.state[w]["memory"]
    assert torch.equal(memory != 0, mask) and set(memory[mask].abs().unique().tolist()) == {tau}


def test_jaguar_options():
    w = torch.nn.Parameter(torch.zeros(100))
    assert JaguarSignSGD([w], lr=1e-3, block_size=25).coord_fraction == 0.25
    for kwargs, needle in [(dict(block_size=0), "block_size"), (dict(coord_fraction=1.5), "fraction"),
                           (dict(coord_fraction=0.1, block_size=5), "not both"), (dict(variant="x"), "variant")]:
        with pytest.raises(ValueError, match=needle):
            JaguarSignSGD([w], lr=1e-3, **kwargs)


def test_blockwise_queries_perturb_one_block_each():
    """f = f1(a) + f2(b): block a's projected gradient comes from probes of a alone."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4))
    ta, tb = torch.randn(6), torch.randn(4)
    f1, f2 = (lambda v: ((v - ta) ** 2).sum()), (lambda v: ((v - tb) ** 4).sum())
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return f1(a) + f2(b)

    x_a, x_b = a.detach().clone(), b.detach().clone()
    opt = ZOSGD([{"params": [a]}, {"params": [b]}], lr=0.01, eps=1e-3, n_queries=2, blockwise=True)
    assert opt.forwards_per_step == 2 * 2 * 2
    opt.step(closure)
    assert calls["n"] == 8
    rec = opt.last_record
    assert len(rec.projected_grads) == 4  # 2 queries x 2 blocks
    from zotune.estimators import DirectionSampler
    from zotune.estimators.spsa import direction_key

    sampler = DirectionSampler("gaussian")
    for index, (param, start, f, x) in enumerate([(a, 0, f1, x_a), (b, 2, f2, x_b)]):
        expected = x.clone()
        for seed, g in zip(rec.query_seeds[start:start + 2], rec.projected_grads[start:start + 2]):
            z = sampler.full(x.numel(), direction_key(seed, index))
            g_alone = (float(f(x + 1e-3 * z)) - float(f(x - 1e-3 * z))) / 2e-3
            assert g == pytest.approx(g_alone, rel=1e-3, abs=1e-3)  # the other block did not move
            expected = expected - 0.01 * (g / 2) * z
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-5)


def test_layer_blocks_split_a_transformer_by_layer():
    from zotune.tuning import layer_blocks

    model = tiny_llama()
    groups = layer_blocks(model, list(model.parameters()))
    assert len(groups) == 3  # 2 layers + (embeddings, norm, tied head)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_conservative_blockwise_counts_every_forward():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        return (a ** 2).sum() + (b ** 2).sum()

    opt = ZOSGDConservative([{"params": [a]}, {"params": [b]}], lr=1e-2, n_queries=2, blockwise=True)
    opt.step(closure)
    assert calls["n"] == opt.forwards_per_step == 2 * 2 * 2 + 3


def test_an_optimizer_is_one_file(tiny_model_dir, reviews_csv, tmp_path):
    """A new optimizer is a class: subclassing ZOOptimizer registers it under its name with the facts
    it declares, and config, factory, trainer, replay and the precision guard take it from there."""
    from safetensors.torch import load_file

    from zotune.cli import main
    from zotune.config import CONFIG_VERSION, load_config
    from zotune.estimators.spsa import GradientEstimate
    from zotune.optim import ZOOptimizer, registry
    from zotune.optim.factory import run_hparams
    from zotune.train.trainer import run_train

    class ToyHalfStepZO(ZOOptimizer):
        """ZO-SGD at half the lr: ``x <- x - lr / 2 * grad_hat``."""

        elementwise = True
        default_lr = {(CONFIG_VERSION, "full"): 2e-3}

        def update_param(self, p: torch.Tensor, index: int, estimate: GradientEstimate, group: dict, state: dict) -> None:
            flat = p.view(-1)
            estimate.per_direction(index, p.numel(), lambda a, b, w, z: flat[a:b].add_(z, alpha=-group["lr"] / 2 * w), p.device)

    try:
        assert registry.zo_class("ToyHalfStepZO") is ToyHalfStepZO and "ToyHalfStepZO" in registry.optimizer_names()
        cfg = load_config(None, [f"model.name={tiny_model_dir}", f"task.path={reviews_csv}", "task.text_template={text} It was",
                                 'task.choices={"0": " bad", "1": " good"}', "task.k_shot=4", "train.steps=3",
                                 "train.batch_size=4", "eval.max_examples=4", "eval.zero_shot=false",
                                 "optimizer.name=ToyHalfStepZO"])
        assert run_hparams(cfg) == (2e-3, 1e-3)  # its own default lr, the family's eps
        run_train(cfg, tmp_path / "run", log=lambda *_: None)
        assert main(["replay", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
        trained, again = load_file(tmp_path / "run" / "weights.safetensors"), load_file(tmp_path / "again" / "weights.safetensors")
        assert all(torch.equal(trained[k], again[k]) for k in trained)
    finally:
        registry.ZEROTH_ORDER.pop("ToyHalfStepZO", None)
