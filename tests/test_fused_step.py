"""The fused one-call decoder step against the fused layers run one by one.

The one-call step runs the layer path's kernels on the same tensors in the
same order, so every comparison with that path is bit for bit (torch.equal);
the fused layers' own agreement with stock fairseq is tested in test_layers,
and here once more end to end against stock's generator.
"""

from __future__ import annotations

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    LAYER_VARIANTS,
    assert_bit_identical_hypos,
    compare_hypotheses,
    decoder_steps,
    fused,
    generate,
    load_multi30k,
    packed_gemm_missing,
    random_sample,
    random_transformer,
    reorder_scenario,
)
from torch import Tensor

from seqfuse.generation import lane as search_lane
from seqfuse.layers import fused_step, kv_cache

pytestmark = pytest.mark.skipif(
    packed_gemm_missing(), reason="seqfuse._C or its packed GEMM kernel not available"
)


def both_paths(monkeypatch, fn):
    """(fn() over the layers, fn() over the one-call step, one-call steps taken)."""
    monkeypatch.setenv(fused_step.FUSED_STEP_ENV, "0")
    layers = fn()
    monkeypatch.delenv(fused_step.FUSED_STEP_ENV)
    before = fused_step.STATS["one_call"]
    one_call = fn()
    return layers, one_call, fused_step.STATS["one_call"] - before


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("beam,bsz", [(1, 6), (5, 6), (5, 24)])
def test_generate_bit_identical_to_layers(monkeypatch, variant, beam, bsz):
    """Whole searches (reorders, finished sentences shrinking the batch, cache
    growth past the initial slots): the one-call step is bit-identical to the
    layer path, and the search agrees with stock fairseq's. At 120 rows the
    step runs its attentions, output projections and norms by row blocks
    (csrc/cpu/fused_stack_cpu.cc, by_rows); at 6 and 30 op by op."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    model, d = random_transformer(60, len(variant) + beam, perturb=True, **LAYER_VARIANTS[variant])
    fast = fused(model)
    sample = random_sample(d, bsz=bsz, seed=beam)
    kw = dict(beam_size=beam, max_len_b=20)
    layers, one_call, taken = both_paths(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert taken > 0
    assert_bit_identical_hypos(layers, one_call, variant)
    with torch.no_grad():
        stock = StockGenerator([model], d, **kw).generate([model], sample)
    compare_hypotheses(stock, one_call, variant)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_steps_reorders_padding_growth(monkeypatch, pre_norm):
    """Decoder level, step by step: logits, alignment attention and every
    inner state, through beam reorders, a batch that shrinks, a padding
    token (written into the cache's key padding) and cache growth."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    over = dict(decoder_normalize_before=pre_norm, encoder_normalize_before=pre_norm)
    model, d = random_transformer(60, 7, layers=3, perturb=True, **over)
    fast, enc, tokens, orders = reorder_scenario(model, d, 14, seed=2)
    layers, one_call, taken = both_paths(
        monkeypatch, lambda: decoder_steps(fast.decoder, enc, tokens, orders)
    )
    assert taken == tokens.size(1)  # the first step too (it creates the caches)
    for t, ((x0, a0, s0), (x1, a1, s1)) in enumerate(zip(layers, one_call)):
        assert torch.equal(x0, x1), f"logits, step {t}"
        assert torch.equal(a0, a1), f"attention, step {t}"
        assert len(s0) == len(s1)
        for i, (u, v) in enumerate(zip(s0, s1)):
            assert torch.equal(u, v), f"inner state {i}, step {t}"


def test_alignment_heads_and_layer(monkeypatch):
    """A chosen alignment layer and head count reach the one-call step."""
    model, d = random_transformer(60, 3, layers=3, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=2, seed=1)
    with torch.no_grad():
        enc = fast.encoder(**sample["net_input"])
    tokens = torch.randint(4, len(d), (2, 5), generator=torch.Generator().manual_seed(3))

    def run():
        state: dict = {}
        out = []
        with torch.no_grad():
            for t in range(1, 6):
                x, extra = fast.decoder(
                    tokens[:, :t],
                    encoder_out=enc,
                    incremental_state=state,
                    alignment_layer=1,
                    alignment_heads=2,
                )
                out.append(extra["attn"][0])
        return out

    layers, one_call, taken = both_paths(monkeypatch, run)
    assert taken == 5
    for a0, a1 in zip(layers, one_call):
        assert torch.equal(a0, a1)


def test_not_taken_without_float32_or_when_off(monkeypatch):
    model, d = random_transformer(60, 1)
    sample = random_sample(d, bsz=2, seed=0)
    kw = dict(beam_size=2, max_len_b=6)
    before = dict(fused_step.STATS)
    generate(fused(model).to(torch.bfloat16), d, sample, **kw)
    assert fused_step.STATS["one_call"] == before["one_call"]
    assert fused_step.STATS["layers"] > before["layers"]
    monkeypatch.setenv(fused_step.FUSED_STEP_ENV, "0")
    before = dict(fused_step.STATS)
    generate(fused(model), d, sample, **kw)
    assert fused_step.STATS["one_call"] == before["one_call"]
    assert "SEQFUSE_FUSED_STEP=0" in fused_step.cached_plan(
        fused(model).decoder, torch.zeros(1, 2, 32)
    )


def test_multi30k_bit_identical_to_layers(monkeypatch):
    """The real model, beam 5, a batch of 16 test sentences."""
    model, task = load_multi30k()
    fast = fused(model)
    ds = task.dataset("test")
    sample = ds.collater([ds[i] for i in range(16)])
    d = task.target_dictionary
    layers, one_call, taken = both_paths(
        monkeypatch, lambda: generate(fast, d, sample, beam_size=5, max_len_b=200)
    )
    assert taken > 0
    assert_bit_identical_hypos(layers, one_call, "multi30k")


def test_plan_follows_weight_changes(monkeypatch):
    """The plan (weight packs) is reused across generations and rebuilt after
    an in-place weight update: the one-call step then matches the layers on
    the new weights."""
    model, d = random_transformer(60, 4, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=3, seed=2)
    kw = dict(beam_size=3, max_len_b=10)
    generate(fast, d, sample, **kw)
    plan = fast.decoder.__dict__["_seqfuse_fused_step_plan"]
    generate(fast, d, sample, **kw)
    assert fast.decoder.__dict__["_seqfuse_fused_step_plan"] is plan
    with torch.no_grad():
        for layer in fast.decoder.layers:
            layer.fc1.weight.mul_(1.5)
            layer.self_attn.k_proj.weight.add_(0.05)
    layers, one_call, taken = both_paths(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert taken > 0
    assert fast.decoder.__dict__["_seqfuse_fused_step_plan"] is not plan
    assert_bit_identical_hypos(layers, one_call, "after an in-place update")


@pytest.mark.parametrize("change", ["parameter", "module", "dict"])
def test_plan_follows_replaced_parameters_and_modules(monkeypatch, change):
    """A parameter or a submodule assigned anew (not updated in place) after
    a generation is seen too, also a parameter written into its module's
    dict directly (what a module conversion does under torch's
    overwrite-on-conversion flag): the next one-call step runs on it, as the
    layers do."""
    model, d = random_transformer(60, 4, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=3, seed=2)
    kw = dict(beam_size=3, max_len_b=10)
    before = generate(fast, d, sample, **kw)
    plan = fast.decoder.__dict__["_seqfuse_fused_step_plan"]
    layer = fast.decoder.layers[1]
    g = torch.Generator().manual_seed(9)
    new_weight = torch.nn.Parameter(torch.randn(layer.fc2.weight.shape, generator=g))
    key = fused_step._params_key(fast.decoder.layers)
    assert fused_step._params_key(fast.decoder.layers) == key  # nothing changed: the same
    if change == "parameter":
        layer.fc2.weight = new_weight
    elif change == "dict":
        layer.fc2._parameters["weight"] = new_weight
    else:
        fc2 = torch.nn.Linear(layer.fc2.in_features, layer.fc2.out_features)
        with torch.no_grad():
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g))
            fc2.bias.copy_(layer.fc2.bias)
        layer.fc2 = fc2
    assert fused_step._params_key(fast.decoder.layers) != key
    layers, one_call, taken = both_paths(monkeypatch, lambda: generate(fast, d, sample, **kw))
    assert taken > 0
    assert fast.decoder.__dict__["_seqfuse_fused_step_plan"] is not plan
    assert_bit_identical_hypos(layers, one_call, f"after a new {change}")
    assert any(
        not torch.equal(a["tokens"], b["tokens"]) or a["score"] != b["score"]
        for x, y in zip(before, one_call)
        for a, b in zip(x, y)
    ), "the change made no difference: the test proves nothing"


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_stack_bit_identical_to_layers(monkeypatch, pre_norm):
    """The fused encoder in one call vs its layers one by one, on a padded
    batch: every output of fairseq's encoder dict; all hidden states asked
    for runs the layers."""
    over = dict(decoder_normalize_before=pre_norm, encoder_normalize_before=pre_norm)
    model, d = random_transformer(60, 11, layers=3, perturb=True, **over)
    fast = fused(model)
    sample = random_sample(d, bsz=5, seed=3)
    assert bool(sample["net_input"]["src_tokens"].eq(d.pad()).any())  # padded

    def encode():
        with torch.no_grad():
            return fast.encoder(**sample["net_input"])

    before = fused_step.STATS["encoder"]
    layers, one_call, _ = both_paths(monkeypatch, encode)
    assert fused_step.STATS["encoder"] - before == 1
    assert layers.keys() == one_call.keys()
    for key, value in layers.items():
        assert len(value) == len(one_call[key]), key
        for u, v in zip(value, one_call[key]):
            assert torch.equal(u, v), key
    with torch.no_grad():
        stock = model.encoder(**sample["net_input"])["encoder_out"][0]
    torch.testing.assert_close(one_call["encoder_out"][0], stock, atol=1e-5, rtol=1e-5)
    before = fused_step.STATS["encoder"]
    with torch.no_grad():
        states = fast.encoder(**sample["net_input"], return_all_hiddens=True)["encoder_states"]
    assert len(states) == 4 and fused_step.STATS["encoder"] == before


def test_initial_slots_do_not_change_results(monkeypatch):
    """Few rows start with room for a whole sentence (no growth on the way),
    many rows with the small default; either way every bit is the same."""
    assert kv_cache.initial_slots(5, 2) == kv_cache.MAX_INITIAL_SLOTS
    assert kv_cache.initial_slots(640, 2) == kv_cache.INITIAL_SLOTS
    assert kv_cache.initial_slots(640, 40) == 40
    for rows in (1, 5, 80, 200, 640):
        slots = kv_cache.initial_slots(rows, 2)
        assert rows * slots <= max(kv_cache.INITIAL_ROW_SLOTS, rows * kv_cache.INITIAL_SLOTS)
    model, d = random_transformer(60, 5, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=1, seed=4)
    kw = dict(beam_size=5, max_len_b=40)
    roomy = generate(fast, d, sample, **kw)
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)
    small = generate(fast, d, sample, **kw)
    assert max(len(h["tokens"]) for h in small[0]) > kv_cache.INITIAL_SLOTS  # it grew
    assert_bit_identical_hypos(small, roomy, "initial slots")


def test_cache_buffers_come_back_and_dirty_ones_change_nothing(monkeypatch):
    """A generation's K/V buffers go back to the pool when its caches are
    dropped (and on a growth), the next generation takes them: memory the
    process has mapped already. Buffers handed back full of NaN (what a
    dropped cache might leave) give every bit of the result a fresh buffer
    gives: a slot is always written before it is read."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # growth: repacks give back too
    pool = kv_cache.BufferPool(16)
    monkeypatch.setattr(kv_cache, "BUFFERS", pool)
    model, d = random_transformer(60, 7, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=3, seed=6)
    kw = dict(beam_size=4, max_len_b=30)
    first = generate(fast, d, sample, **kw)
    free = [b for bs in pool._free.values() for b in bs]
    assert len(free) >= len(fast.decoder.layers)  # every layer's buffer came back
    kept = {b.data_ptr() for b in free}
    for b in free:
        b.fill_(float("nan"))
    taken = []
    orig_take = pool.take

    def spy(numel, dtype, device):
        buf = orig_take(numel, dtype, device)
        taken.append(buf.data_ptr())
        return buf

    monkeypatch.setattr(pool, "take", spy)
    second = generate(fast, d, sample, **kw)
    assert kept & set(taken), "the second generation allocated anew"
    assert_bit_identical_hypos(first, second, "pooled buffers")
    stock = StockGenerator([model], d, **kw).generate([model], sample)
    compare_hypotheses(stock, second, "pooled buffers vs stock")
    pool.clear()
    assert pool.free_bytes() == 0


def test_reorder_all_equals_one_by_one(monkeypatch):
    """Every layer's parent tables gathered by one op call equal each cache's
    own reorder: rows kept, repeated, dropped (a shrink that repacks), and a
    row outside the live ones is refused."""
    monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 0)  # the small shrink repacks
    g = torch.Generator().manual_seed(11)
    c, rows = 4, 12
    like = torch.empty(0)

    def caches():
        out = []
        for _ in range(3):
            cache = kv_cache.SelfAttnCache(rows, 6, c, like)
            gen = torch.Generator().manual_seed(5)  # the same contents in each set
            for _ in range(3):
                cache.append(torch.randn(1, rows, 2 * c, generator=gen), None)
            out.append(cache)
        return out

    a, b = caches(), caches()
    orders = [torch.randint(0, rows, (rows,), generator=g), torch.tensor([3, 3, 7, 1, 0])]
    for order in orders:
        kv_cache.SelfAttnCache.reorder_all(a, order)
        for cache in b:
            cache.reorder(order)
        for x, y in zip(a, b):
            assert x.n == y.n and x.capacity == y.capacity
            assert torch.equal(x.rows[: x.n, : x.length], y.rows[: y.n, : y.length])
            assert torch.equal(x.kv[: x.length], y.kv[: y.length])
    assert a[0].capacity[0] == 5  # the shrink repacked
    with pytest.raises(RuntimeError, match="outside the 5 live rows"):
        kv_cache.SelfAttnCache.reorder_all(a, torch.tensor([0, 5]))


def test_decoder_reorders_its_layers_caches_at_once(monkeypatch):
    """A fused decoder whose only state is its layers' caches reorders them
    with one gather per step; generation is bit-identical to the module walk,
    which runs when another module of the decoder keeps state."""
    model, d = random_transformer(60, 9, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=3, seed=12)
    kw = dict(beam_size=4, max_len_b=20)
    calls = []
    real = kv_cache.SelfAttnCache.reorder_all

    def spy(caches, order):
        calls.append(len(caches))
        return real(caches, order)

    monkeypatch.setattr(kv_cache.SelfAttnCache, "reorder_all", staticmethod(spy))
    at_once = generate(fast, d, sample, **kw)
    assert calls and set(calls) == {len(fast.decoder.layers)}
    calls.clear()

    class Stateful(torch.nn.Module):  # a module the fast path does not know
        def reorder_incremental_state(self, incremental_state, new_order):
            calls.append("walk")

    fast.decoder.extra = Stateful()  # found without further ado: a registration
    walked = generate(fast, d, sample, **kw)
    assert "walk" in calls and not [c for c in calls if c != "walk"]
    assert_bit_identical_hypos(at_once, walked, "reorder at once vs module walk")


def test_buffer_pool_fits_and_bounds():
    cpu = torch.device("cpu")
    assert kv_cache.BufferPool(0).take(8, torch.float32, cpu).numel() == 8
    off = kv_cache.BufferPool(0)  # SEQFUSE_CACHE_POOL=0: keeps nothing
    off.give(off.take(8, torch.float32, cpu))
    assert off.free_bytes() == 0
    pool = kv_cache.BufferPool(2)
    a, b, c = (pool.take(n, torch.float32, cpu) for n in (100, 300, 1000))
    for buf in (a, b, c):
        pool.give(buf)
    assert pool.free_bytes() == (300 + 1000) * 4  # at most 2 kept: the oldest went
    assert pool.take(250, torch.float32, cpu) is b  # smallest that fits
    got = pool.take(400, torch.float32, cpu)  # 1000 > 2 x 400: not taken
    assert got is not c and got.numel() == 400
    assert pool.take(600, torch.float16, cpu).dtype == torch.float16
    stranger = kv_cache.BufferPool(4)
    stranger.give(torch.empty(8))  # never taken from it: past its bound
    assert stranger.free_bytes() == 0


def test_buffer_pool_never_holds_more_than_its_high_water():
    """Free and taken buffers together stay within the most ever taken at
    once: a buffer that fits no free one frees the oldest free ones first, so
    the pool raises no peak; what it keeps between uses is at most that peak."""
    cpu = torch.device("cpu")
    pool = kv_cache.BufferPool(64)
    gen = torch.Generator().manual_seed(4)
    held_max = 0
    taken: list[Tensor] = []
    for _ in range(400):
        if taken and torch.rand(1, generator=gen).item() < 0.5:
            pool.give(taken.pop(int(torch.randint(len(taken), (1,), generator=gen))))
        else:
            numel = int(torch.randint(1, 5000, (1,), generator=gen))
            buf = pool.take(numel, torch.float32, cpu)
            assert buf.numel() >= numel
            taken.append(buf)
        live = sum(b.numel() * 4 for b in taken)
        assert pool.taken_bytes == live
        held_max = max(held_max, live)
        assert live + pool.free_bytes() <= max(pool.high_water, live)
        assert pool.high_water == held_max
    for buf in taken:
        pool.give(buf)
    assert pool.free_bytes() <= held_max


def _whole_network_step(decoder, tokens, enc, state):
    got = decoder.step_logits(tokens, enc, state)
    assert got is not None, (tokens.size(1), state.get(fused_step.LOGITS_PLAN_KEY))
    return got


@pytest.mark.parametrize("call", ["plan object", "op"])
@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
def test_step_logits_bit_identical_to_forward(monkeypatch, variant, call):
    """The whole network of a step in one call (embedding, layers, final norm,
    vocabulary projection) equals the decoder's forward at the last position,
    logits and alignment attention, step by step through reorders, a batch
    that shrinks, a padding token and cache growth; through the C++ plan
    object and through the op (an extension without the object)."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    if call == "op":
        monkeypatch.setattr(fused_step, "_native_plan", lambda decoder, plan: None)
    model, d = random_transformer(60, 11, perturb=True, **LAYER_VARIANTS[variant])
    fast, enc, tokens, orders = reorder_scenario(model, d, 12, seed=5)
    forward = decoder_steps(fast.decoder, enc, tokens, orders)
    whole = decoder_steps(fast.decoder, enc, tokens, orders, _whole_network_step)
    for t, ((x, a, _), (logits, attn)) in enumerate(zip(forward, whole)):
        assert torch.equal(x[:, -1, :], logits), f"logits, step {t}"
        assert torch.equal(a[:, -1, :], attn), f"attention, step {t}"


def test_step_logits_leaves_a_wrapped_or_overridden_decoder_to_its_forward():
    """A wrapper set on the decoder instance, or a subclass's own
    output_layer, is what the user runs: the whole-network step steps aside
    and the search still agrees with stock's."""
    model, d = random_transformer(60, 12, perturb=True)
    sample = random_sample(d, bsz=2, seed=6)
    with torch.no_grad():
        stock = StockGenerator([model], d, beam_size=3).generate([model], sample)

    fast = fused(model)
    calls = []
    real_forward = fast.decoder.forward

    def wrapped(*a, **kw):
        calls.append(1)
        return real_forward(*a, **kw)

    fast.decoder.forward = wrapped
    with torch.no_grad():
        enc = fast.encoder(**sample["net_input"])
    assert fast.decoder.step_logits(sample["net_input"]["src_tokens"][:, :1], enc, {}) is None
    compare_hypotheses(stock, generate(fast, d, sample, beam_size=3), "wrapped forward")
    assert calls

    fast = fused(model)
    cls = type(fast.decoder)
    sub = type("Custom", (cls,), {"output_layer": lambda self, f: cls.output_layer(self, f)})
    fast.decoder.__class__ = sub
    state: dict = {}
    tokens = torch.full((2, 1), d.eos())
    with torch.no_grad():
        enc = fast.encoder(**sample["net_input"])
        assert fast.decoder.step_logits(tokens, enc, state) is None
    assert "output_layer" in state[fused_step.LOGITS_PLAN_KEY]
    compare_hypotheses(stock, generate(fast, d, sample, beam_size=3), "own output_layer")


def test_whole_network_step_checks_its_caches_and_weights():
    """The one-call step runs its kernels on raw pointers after one round of
    checks: a parent-table entry outside the cache's rows, or a packed weight
    of the wrong shape, is refused with a clear error instead of being read
    out of bounds."""
    model, d = random_transformer(60, 13, perturb=True)
    fast, enc, tokens, _ = reorder_scenario(model, d, 8, seed=7)
    state: dict = {}
    with torch.no_grad():
        _whole_network_step(fast.decoder, tokens[:, :1], enc, state)
        _whole_network_step(fast.decoder, tokens[:, :2], enc, state)
        bad = tokens[:, :3].clone()
        bad[2, -1] = len(d) + 5  # a token id outside the embedding table
        with pytest.raises(RuntimeError, match="token"):
            fast.decoder.step_logits(bad, enc, state)
        with pytest.raises(RuntimeError, match="int64"):
            fast.decoder.step_logits(tokens[:, :3].int(), enc, state)
        cache = state[fast.decoder.layers[1]._fused_key]["self"]
        good = cache.rows[3, 0].item()
        cache.rows[3, 0] = cache.capacity[0] + 7  # a physical row that does not exist
        with pytest.raises(RuntimeError, match="kv_rows outside"):
            fast.decoder.step_logits(tokens[:, :3], enc, state)
        cache.rows[3, 0] = good
        plan = dict(state[fused_step.LOGITS_PLAN_KEY])
        assert plan["native"] is not None
        cross = state[fast.decoder.layers[-1]._fused_key]["cross"]
        cross.n -= 1
        with pytest.raises(RuntimeError, match="cross-attention map of layer [0-9]+ holds"):
            fast.decoder.step_logits(tokens[:, :3], enc, state)
        cross.n += 1
        params = list(plan["layers"][4])
        params[12] = params[12][:, :-1].contiguous()  # fc1's pack, one input column short
        plan["layers"] = plan["layers"][:4] + (params,) + plan["layers"][5:]
        # the C++ plan object (built from the plan), then the op
        for native in (fused_step._native_plan(fast.decoder, plan), None):
            state[fused_step.LOGITS_PLAN_KEY] = dict(plan, native=native)
            with pytest.raises(RuntimeError, match="fc1 weight must be packed"):
                fast.decoder.step_logits(tokens[:, :3], enc, state)


def test_step_memory_reused_only_when_let_go(monkeypatch):
    """The whole-network step carves its workspace and logits from one buffer
    kept in the incremental state: a step whose caller let go of the last
    logits reuses it (no fresh memory per step), a step whose caller still
    holds them takes new memory and leaves them as they were, a buffer more
    than 9/8 of the need is replaced (one within that is not); every step's
    logits equal the forward's."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)
    model, d = random_transformer(60, 11, perturb=True)
    fast, enc, tokens, orders = reorder_scenario(model, d, 12, seed=9)
    forward = decoder_steps(fast.decoder, enc, tokens, orders)
    key = fused_step.STEP_MEMORY_KEY
    held: dict = {}  # step -> (logits as returned, their values then)
    events = []

    def step(decoder, toks, enc_, state):
        before = state.get(key)
        before_ptr = None if before is None else before.data_ptr()
        logits, attn = _whole_network_step(decoder, toks, enc_, state)
        memory = state[key]
        # (a view of it; not asked through untyped_storage(), whose Python
        # object would keep a second reference to the buffer from then on)
        lo = memory.data_ptr()
        assert memory.dim() == 1 and lo <= logits.data_ptr() < lo + 4 * memory.numel()
        events.append((before_ptr, memory.data_ptr(), memory.numel(), logits.numel()))
        t = toks.size(1)
        if t % 3 == 0:  # the caller keeps these logits through the next step
            held[t] = (logits, logits.clone())
        return logits.clone(), attn

    whole = decoder_steps(fast.decoder, enc, tokens, orders, step)
    for t, ((x, a, _), (logits, attn)) in enumerate(zip(forward, whole)):
        assert torch.equal(x[:, -1, :], logits), f"logits, step {t}"
        assert torch.equal(a[:, -1, :], attn), f"attention, step {t}"
    for t, (kept, values) in held.items():
        assert torch.equal(kept, values), f"the logits of step {t} were overwritten"
    reused = fresh_while_held = 0
    for t, (before, after, numel, need) in enumerate(events, start=1):
        if before is None:
            continue
        if (t - 1) % 3 == 0:
            assert after != before, f"step {t} wrote into memory its caller still held"
            fresh_while_held += 1
        elif after == before:
            reused += 1
        assert numel >= need
    assert fresh_while_held >= 3 and reused >= 4, events
    # a buffer more than 9/8 of the need is replaced, one within it reused
    state: dict = {}
    with torch.no_grad():
        _whole_network_step(fast.decoder, tokens[:8, :1], enc_for(enc, 8), state)
        need = state[key].numel()
        for size, kept in ((need * 9 // 8 + 1, False), (need * 9 // 8, True)):
            buf = torch.empty(size)
            state[key] = buf
            _whole_network_step(fast.decoder, tokens[:8, :2], enc_for(enc, 8), state)
            assert (state[key].data_ptr() == buf.data_ptr()) == kept, (size, need)
            del buf


def enc_for(enc, rows: int):
    return {
        "encoder_out": [enc["encoder_out"][0][:, :rows]],
        "encoder_padding_mask": [enc["encoder_padding_mask"][0][:rows]],
    }


@pytest.mark.parametrize("threads", [1, 3])
def test_step_logits_independent_of_thread_count(monkeypatch, threads):
    """The one-call step splits each op over the threads of one parallel
    region: with one thread, or with more threads than cores (uneven
    splits), every logit and attention weight still equals the forward's run
    with the default threads."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)
    model, d = random_transformer(60, 11, perturb=True)
    fast, enc, tokens, orders = reorder_scenario(model, d, 12, seed=8)
    forward = decoder_steps(fast.decoder, enc, tokens, orders)  # the default threads
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = decoder_steps(fast.decoder, enc, tokens, orders, _whole_network_step)
    finally:
        torch.set_num_threads(before)
    for t, ((x, a, _), (logits, attn)) in enumerate(zip(forward, whole)):
        assert torch.equal(x[:, -1, :], logits), f"logits, step {t}, {threads} threads"
        assert torch.equal(a[:, -1, :], attn), f"attention, step {t}, {threads} threads"


def test_searches_of_many_rows_do_not_depend_on_threads():
    """With 200 rows a step's products and attentions have enough tasks to
    hand them out in chunks to whichever thread is free (the step region's
    queues, csrc/cpu/task_queue.h): whole searches at 1, 2 and 3 threads give
    the same hypotheses bit for bit."""
    model, d = random_transformer(900, 21, dim=64, perturb=True)
    fast = fused(model)
    sample = random_sample(d, bsz=40, seed=21)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs[threads] = generate(fast, d, sample, beam_size=5, max_len_b=12)
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        assert_bit_identical_hypos(runs[1], runs[threads], f"{threads} threads")


def test_cache_grows_by_blocks_without_moving_its_contents(monkeypatch):
    """Under the one-call step a cache grows by a block of slots: the K/V
    already written stay where they are (no copy), the step reads the blocks
    as they are, and whole searches are bit-identical to growing by copying
    into one buffer (SEQFUSE_KV_BLOCKS=0); a reader of ``kv`` gets the blocks
    merged, the same values."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    model, d = random_transformer(60, 13, perturb=True)
    fast, enc, tokens, orders = reorder_scenario(model, d, 16, seed=9)
    seen = []

    def watch(decoder, toks, e, state):
        got = _whole_network_step(decoder, toks, e, state)
        cache = state[decoder.layers[0]._fused_key]["self"]
        seen.append((len(cache.blocks), cache.blocks[0].data_ptr(), cache.n))
        block_rows.append([b.size(1) for b in cache.blocks])
        return got

    block_rows: list[list[int]] = []
    blocks = decoder_steps(fast.decoder, enc, tokens, orders, watch)
    grown = [i for i in range(1, len(seen)) if seen[i][0] > seen[i - 1][0]]
    assert grown, "no growth by a block happened"
    for i in grown:
        assert seen[i][1] == seen[i - 1][1], "a growth moved the first block"
        assert block_rows[i][-1] == seen[i][2], "a new block holds more than the live rows"
    assert any(len(set(r)) > 1 for r in block_rows), "no block after finished rows left"
    monkeypatch.setenv(kv_cache.KV_BLOCKS_ENV, "0")
    one = decoder_steps(fast.decoder, enc, tokens, orders, _whole_network_step)
    for t, ((l1, a1), (l2, a2)) in enumerate(zip(blocks, one)):
        assert torch.equal(l1, l2) and torch.equal(a1, a2), f"step {t}"
    monkeypatch.delenv(kv_cache.KV_BLOCKS_ENV)

    # merging for a reader of kv
    like = torch.empty(0)
    cache = kv_cache.SelfAttnCache(5, 2, 3, like)
    gen = torch.Generator().manual_seed(3)
    for s in range(7):
        if s + 1 > cache.capacity[1]:
            cache._grow(5, s + 1, by_block=True)
        cache.blocks[-1][s - (cache.capacity[1] - cache.blocks[-1].size(0))].copy_(
            torch.randn(5, 6, generator=gen)
        )
        cache.rows[:, s] = torch.arange(5)
        cache.length = s + 1
    parts = torch.cat(cache.blocks)[:7].clone()
    assert len(cache.blocks) > 1
    assert torch.equal(cache.kv[:7], parts) and len(cache.blocks) == 1


def test_step_refuses_blocks_of_different_rows():
    """A cache whose blocks disagree on the rows is refused with a clear error."""
    model, d = random_transformer(60, 11, perturb=True)
    fast, enc, tokens, orders = reorder_scenario(model, d, 8, seed=7)
    state: dict = {}
    with torch.no_grad():
        _whole_network_step(fast.decoder, tokens[:, :1], enc, state)
        cache = state[fast.decoder.layers[0]._fused_key]["self"]
        cache.blocks.append(torch.zeros(4, cache.capacity[0] + 1, cache.blocks[0].size(2)))
        cache.rows = torch.zeros(cache.rows.size(0), cache.rows.size(1) + 4, dtype=torch.long)
        with pytest.raises(RuntimeError, match="self cache blocks must be"):
            fast.decoder.step_logits(tokens[:, :2], enc, state)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_fc2_skips_zeros_only_after_relu_with_finite_weights(monkeypatch, act):
    """The plans let fc2 skip zero activations after a ReLU when its weight is
    finite (0 * inf is NaN where a skipped term adds nothing); with an inf
    there every term is multiplied, and the stack gives the layers' NaNs."""
    model, d = random_transformer(vocab=40, seed=5, activation_fn=act)
    model = fused(model).requires_grad_(False)
    x = torch.zeros(1, 1, model.decoder.embed_tokens.embedding_dim)
    nums = fused_step.step_plan(model.decoder, x)["nums"]
    per_layer = len(nums) // len(model.decoder.layers)
    assert nums[per_layer - 1 :: per_layer] == [float(act == "relu")] * len(model.decoder.layers)
    enc = fused_step.encoder_plan(model.encoder, x)["nums"]
    per_layer_enc = len(enc) // len(model.encoder.layers)
    assert enc[per_layer_enc - 1] == float(act == "relu")
    with torch.no_grad():
        model.decoder.layers[0].fc2.weight[3, 7] = float("inf")
        model.encoder.layers[0].fc2.weight[3, 7] = float("inf")
    assert fused_step.step_plan(model.decoder, x)["nums"][per_layer - 1] == 0.0
    assert fused_step.encoder_plan(model.encoder, x)["nums"][per_layer_enc - 1] == 0.0
    net = random_sample(d, bsz=3, seed=5)["net_input"]

    def encode():
        with torch.no_grad():
            return model.encoder(net["src_tokens"], net["src_lengths"])["encoder_out"][0]

    layers, one_call, _ = both_paths(monkeypatch, encode)
    assert bool(layers.isnan().any())
    torch.testing.assert_close(one_call, layers, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("variant", ["post-norm relu", "pre-norm", "learned positions"])
def test_next_steps_give_the_full_paths_bits(monkeypatch, variant):
    """Between whole-network steps of a search, the step and the caches'
    reorder skip the lookups and checks that cannot change
    (``fused_step._next_step``, ``fused_step.next_reorder``): taken on most
    steps, the search's every bit is the full path's, through growth past the
    initial slots, finished sentences shrinking the batch and repacks."""
    monkeypatch.setattr(kv_cache, "INITIAL_ROW_SLOTS", 0)  # start small: growth happens
    monkeypatch.setenv(search_lane.LANE_ENV, "0")  # the loop's steps (the lane: test_lane.py)
    model, d = random_transformer(60, 9, perturb=True, **LAYER_VARIANTS[variant])
    fast = fused(model)
    sample = random_sample(d, bsz=6, seed=3)
    kw = dict(beam_size=5, max_len_b=24)
    taken = {"step": 0, "reorder": 0}
    next_step, next_reorder = fused_step._next_step, fused_step.next_reorder

    def counted_step(*a):
        got = next_step(*a)
        taken["step"] += got is not None
        return got

    def counted_reorder(*a):
        got = next_reorder(*a)
        taken["reorder"] += got
        return got

    from seqfuse.layers import fairseq as fairseq_layers

    monkeypatch.setattr(fused_step, "_next_step", counted_step)
    monkeypatch.setattr(fairseq_layers, "next_reorder", counted_reorder)
    steps_before = fused_step.STATS["one_call"]
    quick = generate(fast, d, sample, **kw)
    steps = fused_step.STATS["one_call"] - steps_before
    assert steps > 0 and taken["step"] > steps // 2 and taken["reorder"] > steps // 2, taken
    assert taken["step"] < steps and taken["reorder"] < steps  # growth, shrinks: full paths
    monkeypatch.setattr(fused_step, "_next_step", lambda *a: None)
    monkeypatch.setattr(fairseq_layers, "next_reorder", lambda *a: False)
    full = generate(fast, d, sample, **kw)
    assert_bit_identical_hypos(full, quick, variant)
