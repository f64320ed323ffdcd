"""Contract guarantees of ZOSGD (docs/contract.md): exactness, determinism, state, faults, maths."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zotune.estimators import SPSA, DirectionSampler, Perturbation
from zotune import optim
from zotune.estimators.spsa import GradientEstimate, direction_key
from zotune.optim import ZOSGD

from .conftest import tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def identical(a: list[torch.Tensor], b) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.detach().view(torch.uint8)) for x, y in zip(a, b))


def closure_for(model, batch):
    return lambda: model(**batch).loss


@pytest.fixture(params=["one-chunk", "many-chunks"], autouse=True)
def chunking(request, monkeypatch):
    """Run every test twice: whole parameters per chunk, perturbed in place (the tiny model is a
    small trainable set, like a LoRA), and small chunks drawn on two threads, perturbed on the
    fly by the mode (the path full fine-tuning of real models takes, whose parameters span many
    1M-value chunks)."""
    if request.param == "many-chunks":
        monkeypatch.setattr(Perturbation, "in_place_numel", 0)
        from zotune.estimators import directions

        init = directions.DirectionSampler.__init__

        def small_chunks(self, distribution="gaussian", chunk_size=256, threads=2):
            init(self, distribution, chunk_size=256, threads=threads)

        monkeypatch.setattr(directions.DirectionSampler, "__init__", small_chunks)
        # and the tied 128 x 32 embedding / LM head read in blocks of 9 rows, as a real model's
        monkeypatch.setattr(Perturbation, "large_numel", 128 * 32)
        monkeypatch.setattr(Perturbation, "block_numel", 300)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lr_zero_is_bit_exact(dtype, tiny_batch):
    model = tiny_llama(dtype)
    before = snapshot(model)
    opt = ZOSGD(model.parameters(), lr=0.0, eps=1e-3, seed=3, weight_decay=0.1)
    for _ in range(4):
        loss = opt.step(closure_for(model, tiny_batch))
        assert torch.isfinite(loss)
    assert identical(before, model.parameters())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_seed_same_weights_bit_for_bit(dtype, tiny_batch):
    runs = []
    for _ in range(2):
        model = tiny_llama(dtype)
        opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=7, n_queries=2)
        for _ in range(3):
            opt.step(closure_for(model, tiny_batch))
        runs.append(snapshot(model))
    assert identical(runs[0], runs[1])
    assert not identical(snapshot(tiny_llama(dtype)), runs[0]), "the steps must move the weights"

    other = tiny_llama(dtype)
    opt = ZOSGD(other.parameters(), lr=1e-3, eps=1e-2, seed=8, n_queries=2)
    for _ in range(3):
        opt.step(closure_for(other, tiny_batch))
    assert not identical(runs[0], other.parameters()), "another seed must give other weights"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_state_dict_round_trip_continues_bit_identically(dtype, tiny_batch):
    model = tiny_llama(dtype)
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2, seed=11)
    for _ in range(2):
        opt.step(closure_for(model, tiny_batch))
    saved_weights, saved_state = snapshot(model), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure_for(model, tiny_batch))
    uninterrupted = snapshot(model)

    resumed = tiny_llama(dtype)
    with torch.no_grad():
        for p, w in zip(resumed.parameters(), saved_weights):
            p.copy_(w)
    opt2 = ZOSGD(resumed.parameters(), lr=1e-3, eps=1e-2, seed=999)  # seed comes from the state
    opt2.load_state_dict(saved_state)
    for _ in range(3):
        opt2.step(closure_for(resumed, tiny_batch))
    assert identical(uninterrupted, resumed.parameters())
    assert opt2.steps_done == opt.steps_done == 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_closure_that_raises_leaves_weights_intact(dtype, tiny_batch):
    model = tiny_llama(dtype)
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2)
    calls = {"n": 0}

    def failing():
        calls["n"] += 1
        loss = model(**tiny_batch).loss  # runs a perturbed forward first
        if calls["n"] == 2:  # fail inside the second probe
            raise RuntimeError("boom")
        return loss

    before = snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert identical(before, model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_and_counts(bad, tiny_batch):
    model = tiny_llama()
    opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2)
    before = snapshot(model)
    loss = opt.step(lambda: model(**tiny_batch).loss * bad)
    assert not torch.isfinite(loss)
    assert opt.skipped_steps == 1 and opt.last_record.skipped
    assert identical(before, model.parameters())
    opt.step(closure_for(model, tiny_batch))  # a good step afterwards still moves
    assert opt.skipped_steps == 1
    assert not identical(before, model.parameters())


def test_update_is_mezo_formula():
    """x <- x - lr * (mean_j g_j z_j + wd * x), g_j = (f(x+eps z_j) - f(x-eps z_j)) / (2 eps)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(50))
    target = torch.randn(50)
    f = lambda v: ((v - target) ** 2).sum()  # noqa: E731
    lr, eps, wd, q = 0.01, 1e-3, 0.1, 3
    opt = ZOSGD([w], lr=lr, eps=eps, seed=5, n_queries=q, weight_decay=wd)
    x = w.detach().clone()
    opt.step(lambda: f(w))
    rec = opt.last_record
    sampler = DirectionSampler("gaussian")
    expected = x * (1 - lr * wd)
    for seed, g in zip(rec.query_seeds, rec.projected_grads):
        z = sampler.full(50, direction_key(seed, 0))
        g_manual = (float(f(x + eps * z)) - float(f(x - eps * z))) / (2 * eps)
        assert g == pytest.approx(g_manual, rel=1e-3, abs=1e-3)
        expected = expected - lr * (g / q) * z
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher", "gaussian-table"])
def test_estimate_is_unbiased_on_a_quadratic(distribution):
    """E[g z] = grad f: the mean of many SPSA estimates approaches the true gradient; with a
    noise table too (windows at hashed offsets are uncorrelated coordinates)."""
    torch.manual_seed(0)
    d = 8
    a = torch.randn(d, d)
    a = a @ a.T / d + torch.eye(d)
    b = torch.randn(d)
    x = torch.nn.Parameter(torch.randn(d))
    true_grad = a @ x.detach() + b
    f = lambda: 0.5 * x @ a @ x + b @ x  # noqa: E731
    spsa = SPSA(eps=1e-2, n_queries=1, distribution=distribution.removesuffix("-table"))
    if distribution.endswith("-table"):
        spsa.sampler.chunk_size = 64  # a table of 64 chunks: windows at many offsets
        spsa.sampler.use_table(4096)
    n = 4000
    total = torch.zeros(d)
    with torch.no_grad():
        for s in range(n):
            total += spsa.estimate(f, [x], [0], step_seed=s).materialize(0, torch.empty(d))
    mean = total / n
    rel_err = (mean - true_grad).norm() / true_grad.norm()
    assert rel_err < 0.12, rel_err  # Monte-Carlo error ~ sqrt(d / n) ~ 0.045
    # and a single estimate is far from exact, so the average is doing the work
    single = spsa.estimate(f, [x], [0], step_seed=n + 1).materialize(0, torch.empty(d))
    assert (single - true_grad).norm() / true_grad.norm() > rel_err


def test_probe_sees_perturbed_weights_and_tied_uses_agree():
    """Inside a probe every use of a parameter, tied or not, reads x + eps*z(x)."""
    model = tiny_llama()
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert emb is head
    params = list(model.parameters())
    sampler = DirectionSampler("gaussian")
    keys = [direction_key(42, i) for i in range(len(params))]
    seen = []
    hook = lambda mod, args, out: seen.append(mod.weight.clone())  # noqa: E731
    handles = [model.model.embed_tokens.register_forward_hook(hook), model.lm_head.register_forward_hook(hook)]
    with torch.no_grad(), Perturbation.along(params, keys, 0.5, sampler):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    for h in handles:
        h.remove()
    i = params.index(emb)
    expected = emb.detach() + 0.5 * sampler.full(emb.numel(), keys[i]).view(emb.shape)
    assert len(seen) == 2
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(seen[0], seen[1])


def test_only_trainable_params_and_groups_with_lr_move(tiny_batch):
    model = tiny_llama()
    frozen = model.model.norm.weight
    frozen.requires_grad_(False)
    slow = list(model.model.layers[0].parameters())
    slow_ids = {id(p) for p in slow}
    rest = [p for p in model.parameters() if id(p) not in slow_ids]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt = ZOSGD([{"params": slow, "lr": 0.0}, {"params": rest}], lr=1e-2, eps=1e-2)
    opt.step(closure_for(model, tiny_batch))
    assert torch.equal(frozen, before[id(frozen)])
    assert all(torch.equal(p, before[id(p)]) for p in slow)
    moved = [p for p in rest if p.requires_grad and not torch.equal(p, before[id(p)])]
    assert len(moved) == sum(1 for p in rest if p.requires_grad)


def test_no_model_sized_temporaries(tiny_batch, monkeypatch):
    """Pooled perturbation buffers never exceed the build-ahead budget plus two parameters'
    worth (an op's weight and bias), far from a copy of the model."""
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # the mode's buffers
    model = tiny_llama()
    sizes = sorted((p.numel() for p in model.parameters()), reverse=True)
    monkeypatch.setattr(Perturbation, "ahead_numel", 2 * sizes[0])
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2)
    for _ in range(2):  # the second step builds ahead (it knows the order of use)
        opt.step(closure_for(model, tiny_batch))
    pooled = sum(b.numel() for bufs in opt.estimator._pool._free.values() for b in bufs)
    assert 0 < pooled <= Perturbation.ahead_numel + 2 * sum(sorted(set(sizes), reverse=True)[:4])
    assert pooled < sum(sizes) / 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=1e-3, eps=0.0), "eps"),
        (dict(lr=1e-3, n_queries=0), "n_queries"),
        (dict(lr=1e-3, distribution="uniform"), "distribution"),
        (dict(lr=1e-3, weight_decay=-0.1), "weight_decay"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ZOSGD([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_step_needs_a_closure():
    opt = ZOSGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_rademacher_directions_are_signs():
    z = DirectionSampler("rademacher", chunk_size=1000).full(2500, key=3)
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 0.1


def test_tied_weights_are_built_once_per_probe_after_the_first(tiny_batch, monkeypatch):
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # the mode's buffers
    monkeypatch.setattr(Perturbation, "large_numel", 1 << 62)  # built whole, not read in blocks
    model = tiny_llama()
    opt = ZOSGD(model.parameters(), lr=1e-3, eps=1e-2)
    n_params = len(list(model.parameters()))  # the tied embedding/head counts once
    opt.step(closure_for(model, tiny_batch))
    first = opt.estimator.materializations
    assert first == (n_params + 1) + n_params  # the + probe learns the tie, the - probe reuses it
    opt.step(closure_for(model, tiny_batch))
    assert opt.estimator.materializations - first == 2 * n_params


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_do_not_depend_on_threads(distribution):
    """Chunks drawn concurrently equal chunks drawn in order: z is a function of the key only."""
    n = 5 * 1000 + 17
    one = DirectionSampler(distribution, chunk_size=1000, threads=1)
    two = DirectionSampler(distribution, chunk_size=1000, threads=2)
    out = torch.empty(n)

    def write(start, stop, z):
        out[start:stop] = z

    two.apply(n, 99, write)
    assert torch.equal(out, one.full(n, 99))
    assert not torch.equal(out, one.full(n, 100))


def test_metadata_reads_do_not_build_perturbed_copies(monkeypatch):
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # under the mode
    w = torch.nn.Parameter(torch.randn(4, 3))
    pert = Perturbation.along([w], [1], 0.5, DirectionSampler("gaussian"))
    with torch.no_grad(), pert:
        assert w.dtype == torch.float32 and w.shape == (4, 3) and w.size(0) == 4 and w.dim() == 2
        assert pert.materializations == 0
        t = w.T  # a view of the values: must see the perturbation
        assert pert.materializations == 1
    z = DirectionSampler("gaussian").full(12, 1).view(4, 3)
    torch.testing.assert_close(t, (w.detach() + 0.5 * z).T, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_large_weights_read_in_blocks_give_the_same_values(tied, monkeypatch):
    """An embedding / LM head read row by row and block by block (never built whole) gives the
    outputs of building it whole, for sums of several directions too: the embedded rows
    bit-identical, the logits up to the matmul's summation order (blocks may take another kernel)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    params = list(model.parameters())
    ids = torch.randint(0, 300, (3, 11))
    sampler = DirectionSampler("gaussian", chunk_size=1000)  # rows of 32 straddle chunk ends
    terms = [[(i + 7, 0.01), (i + 99, -0.003)] for i in range(len(params))]

    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # reading in blocks is the mode's
    def probe(large_numel: int):
        monkeypatch.setattr(Perturbation, "large_numel", large_numel)
        monkeypatch.setattr(Perturbation, "block_numel", 700)
        pool_sizes = []
        pert = Perturbation(params, terms, sampler)
        take = pert.pool.take
        pert.pool.take = lambda n, *a: pool_sizes.append(n) or take(n, *a)
        embedded = []
        hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: embedded.append(out))
        with torch.no_grad(), pert:
            logits = model(input_ids=ids).logits
        hook.remove()
        return embedded[0], logits, max(pool_sizes)

    whole_rows, whole, whole_peak = probe(1 << 62)
    block_rows, blocks, blocks_peak = probe(300 * 32)
    assert torch.equal(whole_rows, block_rows)
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-5)
    unperturbed = model(input_ids=ids).logits
    assert (unperturbed - whole).abs().max() > 1e-3  # the perturbation shows in the logits
    assert whole_peak == 300 * 32 and blocks_peak < 300 * 32  # never the whole 300 x 32 matrix


def test_rows_of_a_perturbed_matrix_draw_only_their_chunks():
    """``rows`` in any order, repeated, equals indexing the whole perturbed matrix, and draws
    only the chunks of z that hold those rows."""
    torch.manual_seed(0)
    w = torch.randn(300, 32)
    sampler = DirectionSampler("gaussian", chunk_size=1000)  # rows straddle chunk ends
    terms = [(5, 0.01), (6, -0.02)]
    rows = torch.tensor([250, 3, 40, 3, 31, 299])
    drawn = []
    fill = sampler._fill
    sampler._fill = lambda key, index, *a: drawn.append(index) or fill(key, index, *a)
    picked = Perturbation([w], [terms], sampler).rows(w, terms, rows)
    size = sampler.chunk_size  # 1000, or the fixture's 256
    hit = {r * 32 // size for r in rows.tolist()} | {((r + 1) * 32 - 1) // size for r in rows.tolist()}
    assert set(drawn) == hit and len(drawn) == 2 * len(hit) < 2 * (300 * 32 // size)  # not every chunk
    whole = Perturbation([w], [terms], sampler).materialize(w, terms)
    assert torch.equal(picked, whole[rows])


@pytest.mark.parametrize("name", ["ZOAdam", "ZOSGDMomentum", "ZOSGDSign"])
def test_streamed_updates_equal_the_whole_tensor_formulas(name):
    """The rules that read grad_hat chunk by chunk move each parameter exactly as the formula
    on the whole estimate (materialised) does, over several steps and two queries."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(2500))
    x = torch.randn(2500)
    opt = getattr(optim, name)([w], lr=1e-2, eps=1e-3, n_queries=2, weight_decay=0.1)
    opt.estimator.sampler = DirectionSampler("gaussian", chunk_size=1000)
    expected = w.detach().clone()
    m, v = torch.zeros(2500), torch.zeros(2500)
    for t in range(1, 4):
        opt.step(lambda: (w * x).sum().pow(2))
        record = opt.last_record
        estimate = GradientEstimate(record.query_seeds, record.projected_grads, 0.0, [], opt.estimator.sampler)
        g = estimate.materialize(0, torch.empty(2500))
        expected.mul_(1 - 1e-2 * 0.1)
        if name == "ZOAdam":
            m.mul_(0.9).add_(g, alpha=0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = v.sqrt().div_(math.sqrt(1 - 0.999**t)).add_(1e-8)
            expected.addcdiv_(m, denom, value=-1e-2 / (1 - 0.9**t))
        elif name == "ZOSGDMomentum":
            m.mul_(0.9).add_(g)
            expected.add_(m, alpha=-1e-2)
        else:
            expected.add_(g.sign(), alpha=-1e-2)
        assert torch.equal(w.detach(), expected)


def test_building_ahead_changes_no_value(tiny_batch, monkeypatch):
    """Parameters built ahead, several at once on two threads, give the weights of building
    each one when its op comes, bit for bit."""
    monkeypatch.setattr(Perturbation, "in_place_numel", 0)  # building ahead is the mode's
    def run(ahead: int) -> tuple[list[torch.Tensor], int]:
        monkeypatch.setattr(Perturbation, "ahead_numel", ahead)
        model = tiny_llama()
        opt = ZOSGD(model.parameters(), lr=1e-2, eps=1e-2, seed=5)
        waiting = []  # copies built ahead and not yet used, after each build
        build = Perturbation.build
        monkeypatch.setattr(Perturbation, "build", lambda self, pid: (build(self, pid), waiting.append(len(self._ahead)))[0])
        for _ in range(3):
            opt.step(closure_for(model, tiny_batch))
        return snapshot(model), max(waiting)

    one_at_a_time, most = run(0)
    ahead, most_ahead = run(1 << 20)
    assert most == 0 and most_ahead > 1
    assert identical(one_at_a_time, ahead)
