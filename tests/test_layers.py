"""Fused fairseq layers vs the stock layers with the same weights: layer level
(full-sequence and incremental, pre/post-norm, padding), whole-model beam
search with fairseq's stock SequenceGenerator, and the real Multi30k model."""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.transformer import TransformerModel, base_architecture
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from fairseq.sequence_generator import SequenceGenerator

from seqfuse.layers import (
    FusedTransformerDecoderLayer,
    FusedTransformerEncoderLayer,
    kv_cache,
    optimize_fairseq_model,
)

REPO = Path(__file__).resolve().parents[1]
MULTI30K = REPO.parent / "shared" / "models" / "multi30k_en_de"
ATOL = RTOL = 1e-5  # fp32 parity of the product contract (allclose semantics)


def assert_close(a, b, what="", atol=ATOL):
    err = (a.float() - b.float()).abs()
    bad = err > atol + RTOL * b.float().abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[err[bad].argmax()])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} off by > {atol}; worst {err[idx].item():.3g} at {idx}"
        )


class _Task:
    def __init__(self, d):
        self.source_dictionary = self.target_dictionary = d


def make_dict(n=60):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def make_model(
    seed=0,
    pre_norm=False,
    learned_pos=False,
    act="relu",
    dim=32,
    heads=4,
    layers=2,
    d=None,
    spread=0.25,
    eos_boost=2.5,
    **kw,
):
    torch.manual_seed(seed)
    d = d or make_dict()
    args = argparse.Namespace(
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=2 * dim,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        decoder_embed_dim=dim,
        decoder_ffn_embed_dim=2 * dim,
        decoder_layers=layers,
        decoder_attention_heads=heads,
        dropout=0.0,
        share_all_embeddings=kw.pop("share_all_embeddings", True),
        encoder_normalize_before=pre_norm,
        decoder_normalize_before=pre_norm,
        encoder_learned_pos=learned_pos,
        decoder_learned_pos=learned_pos,
        activation_fn=act,
        max_source_positions=128,
        max_target_positions=128,
        **kw,
    )
    base_architecture(args)
    model = TransformerModel.build_model(args, _Task(d))
    with torch.no_grad():  # spread the weights so that beams and lengths differ
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, spread if "embed" not in name else 1.0)
            else:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.2)
        emb = model.decoder.embed_tokens.weight
        emb[d.eos()] *= eos_boost  # EOS logits spread widely: hypotheses end at varied steps
    return model.eval(), d


def _layer_cfg_model(pre_norm, act="relu"):
    model, _ = make_model(
        seed=3, pre_norm=pre_norm, act=act, dim=48, heads=6, layers=1, spread=0.15
    )
    return model


# -- layer level ---------------------------------------------------------------
@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_encoder_layer(pre_norm, act):
    stock = _layer_cfg_model(pre_norm, act).encoder.layers[0]
    fused = FusedTransformerEncoderLayer.from_layer(stock)
    t, b = 97, 3
    x = torch.randn(t, b, 48)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[0, :20] = True  # left-padded source
    with torch.no_grad():
        for mask in (pad, None):
            assert_close(
                fused(x, mask), stock(x, mask), f"encoder pre={pre_norm} mask={mask is not None}"
            )


@pytest.mark.parametrize("pre_norm", [False, True])
def test_decoder_layer_full_sequence(pre_norm):
    model = _layer_cfg_model(pre_norm)
    stock = model.decoder.layers[0]
    fused = FusedTransformerDecoderLayer.from_layer(stock)
    t, s, b = 97, 31, 4
    x, enc = torch.randn(t, b, 48), torch.randn(s, b, 48)
    enc_pad = torch.zeros(b, s, dtype=torch.bool)
    enc_pad[1, :9] = True
    self_pad = torch.zeros(b, t, dtype=torch.bool)
    self_pad[2, -5:] = True
    mask = model.decoder.buffered_future_mask(x)
    with torch.no_grad():
        y1, a1, _ = stock(
            x,
            enc,
            enc_pad,
            None,
            self_attn_mask=mask,
            self_attn_padding_mask=self_pad,
            need_attn=True,
            need_head_weights=True,
        )
        y2, a2, _ = fused(
            x,
            enc,
            enc_pad,
            None,
            self_attn_mask=mask,
            self_attn_padding_mask=self_pad,
            need_attn=True,
            need_head_weights=True,
        )
    # The padded target positions attend to nothing useful but stay finite in both.
    assert_close(y2, y1, "decoder full sequence")
    assert_close(a2, a1, "cross-attention weights")


@pytest.mark.parametrize("pre_norm", [False, True])
@pytest.mark.parametrize("beam", [1, 3])
def test_decoder_layer_incremental_with_reorder(pre_norm, beam):
    """Step by step with caches, reorders inside beams, and a batch shrink."""
    model = _layer_cfg_model(pre_norm)
    stock = model.decoder.layers[0]
    fused = FusedTransformerDecoderLayer.from_layer(stock)
    for m in (stock, fused):
        for mod in m.modules():
            if hasattr(mod, "set_beam_size"):
                mod.set_beam_size(beam)
    g = torch.Generator().manual_seed(beam)
    sents, s = 3, 11
    enc1 = torch.randn(s, sents, 48, generator=g)
    enc = enc1.repeat_interleave(beam, dim=1)  # the generator repeats the encoder output
    enc_pad = torch.zeros(sents, s, dtype=torch.bool)
    enc_pad[0, :4] = True
    enc_pad = enc_pad.repeat_interleave(beam, dim=0)
    st_stock, st_fused = {}, {}
    rows = sents * beam
    with torch.no_grad():
        for step in range(40):  # past the initial cache length: the cache grows
            x = torch.randn(1, rows, 48, generator=g)
            y1, a1, _ = stock(x, enc, enc_pad, st_stock, need_attn=True)
            y2, a2, _ = fused(x, enc, enc_pad, st_fused, need_attn=True)
            assert_close(y2, y1, f"step {step}")
            assert_close(a2, a1, f"attn step {step}")
            # parents from the same sentence's beams; drop sentence 1 at step 25
            live = list(range(rows // beam))
            if step == 25 and len(live) > 1:
                live = [0, 2]
            order = []
            for sidx in live:
                order += (sidx * beam + torch.randint(0, beam, (beam,), generator=g)).tolist()
            new_order = torch.tensor(order)
            stock.encoder_attn.reorder_incremental_state(st_stock, new_order)
            stock.self_attn.reorder_incremental_state(st_stock, new_order)
            fused.reorder_incremental_state(st_fused, new_order)
            if len(live) * beam != rows:
                enc = enc.index_select(1, new_order)
                enc_pad = enc_pad.index_select(0, new_order)
                rows = len(live) * beam


def test_parameters_shared_and_state_dict_round_trip():
    model, _ = make_model(seed=1, spread=0.15)
    before = {k: v for k, v in model.state_dict().items()}
    params_before = {n: p for n, p in model.named_parameters()}
    ok, why = optimize_fairseq_model(model)
    assert ok, why
    assert list(model.state_dict()) == list(before)
    for n, p in model.named_parameters():
        assert p is params_before[n], n  # the very same Parameter objects
    assert isinstance(model.decoder.layers[0], TransformerDecoderLayerBase)
    assert isinstance(model.encoder.layers[0], TransformerEncoderLayerBase)
    # Loading other weights after the swap changes the fused computation too.
    other, _ = make_model(seed=2, spread=0.15)
    model.load_state_dict(other.state_dict())
    src = torch.randint(4, 60, (2, 9))
    g = torch.Generator().manual_seed(0)
    tgt = torch.randint(4, 60, (2, 6), generator=g)
    with torch.no_grad():
        out = model(src, torch.tensor([9, 9]), tgt)[0]
        ref = other(src, torch.tensor([9, 9]), tgt)[0]
    assert_close(out, ref, "after load_state_dict")
    sd = model.state_dict()
    assert all(torch.equal(sd[k], other.state_dict()[k]) for k in sd)


def test_training_mode_delegates_with_autograd():
    model, _ = make_model(seed=4, pre_norm=True)
    ref = copy.deepcopy(model)
    assert optimize_fairseq_model(model)[0]
    model.train()
    ref.train()
    src, tgt = torch.randint(4, 60, (3, 8)), torch.randint(4, 60, (3, 7))
    lens = torch.full((3,), 8)
    loss1 = model(src, lens, tgt)[0].logsumexp(-1).sum()
    loss2 = ref(src, lens, tgt)[0].logsumexp(-1).sum()
    loss1.backward()
    loss2.backward()
    assert_close(loss1.detach(), loss2.detach(), "loss", atol=1e-4)
    p1 = dict(model.named_parameters())
    for n, p in ref.named_parameters():
        assert_close(p1[n].grad, p.grad, f"grad {n}", atol=1e-4)


def test_eval_forward_matches_stock():
    model, _ = make_model(seed=5, learned_pos=True, spread=0.15)
    ref = copy.deepcopy(model)
    assert optimize_fairseq_model(model)[0]
    src = torch.randint(4, 60, (3, 10))
    src[0, :3] = 1
    tgt = torch.randint(4, 60, (3, 7))
    tgt[2, -2:] = 1
    lens = src.ne(1).sum(1)
    with torch.no_grad():
        o1, e1 = model(src, lens, tgt)
        o2, e2 = ref(src, lens, tgt)
    assert_close(o1, o2, "logits")
    assert_close(e1["attn"][0], e2["attn"][0], "alignment attention")


# -- refusals --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"cross_self_attention": True}, "cross-self"),
        ({"adaptive_softmax_cutoff": "20", "share_all_embeddings": False}, "adaptive softmax"),
        ({"quant_noise_pq": 0.1, "quant_noise_pq_block_size": 8}, "quant noise"),
        ({"activation_fn": "relu_squared"}, "activation"),
    ],
)
def test_refuses_and_leaves_model_untouched(kw, reason):
    act = kw.pop("activation_fn", "relu")
    model, _ = make_model(seed=0, act=act, **dict(kw))
    layers = [id(m) for m in model.modules()]
    ok, why = optimize_fairseq_model(model)
    assert not ok and reason in why, why
    assert [id(m) for m in model.modules()] == layers


def test_refuses_non_transformer_and_layerdrop_in_training():
    assert optimize_fairseq_model(torch.nn.Linear(2, 2))[0] is False
    model, _ = make_model(seed=0, decoder_layerdrop=0.2)
    model.train()
    ok, why = optimize_fairseq_model(model)
    assert not ok and "layerdrop" in why


def test_head_size_refused():
    model, _ = make_model(seed=0, dim=1040, heads=2, layers=1)
    ok, why = optimize_fairseq_model(model)
    assert not ok and "head size" in why


# -- whole model with fairseq's stock SequenceGenerator ----------------------------
def _compare_generation(model, ref, d, src, beam, max_len_b=30):
    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    shrinks = []
    orig = kv_cache.CrossAttnCache.reorder

    def spy(self, new_order):
        if self.n * self.beam != new_order.numel():
            shrinks.append(new_order.numel())
        return orig(self, new_order)

    kv_cache.CrossAttnCache.reorder = spy
    try:
        h2 = SequenceGenerator([model], d, beam_size=beam, max_len_b=max_len_b).forward(sample)
    finally:
        kv_cache.CrossAttnCache.reorder = orig
    h1 = SequenceGenerator([ref], d, beam_size=beam, max_len_b=max_len_b).forward(sample)
    lengths = set()
    for i, (a, b) in enumerate(zip(h1, h2)):
        assert len(a) == len(b)
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x["tokens"], y["tokens"]), (i, j, x["tokens"], y["tokens"])
            assert_close(y["score"], x["score"], f"score {i}/{j}")
            assert_close(y["positional_scores"], x["positional_scores"], f"positional {i}/{j}")
            assert_close(y["attention"], x["attention"], f"attention {i}/{j}")
            lengths.add(len(x["tokens"]))
    return shrinks, lengths


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beam", [1, 4, 5])
def test_generation_matches_stock(seed, beam):
    pre_norm = seed == 1
    model, d = make_model(seed=seed, pre_norm=pre_norm, learned_pos=seed == 2)
    ref = copy.deepcopy(model)
    ok, why = optimize_fairseq_model(model)
    assert ok, why
    g = torch.Generator().manual_seed(3)
    src = torch.randint(4, 60, (8, 10), generator=g)
    src[6, :3] = d.pad()  # left-padded sources
    src[7, :5] = d.pad()
    shrinks, lengths = _compare_generation(model, ref, d, src, beam)
    assert len(lengths) > 1  # hypotheses end at different steps


def test_generation_exercises_batch_shrink():
    model, d = make_model(seed=1, pre_norm=True)
    ref = copy.deepcopy(model)
    assert optimize_fairseq_model(model)[0]
    src = torch.randint(4, 60, (8, 10), generator=torch.Generator().manual_seed(3))
    shrinks, _ = _compare_generation(model, ref, d, src, beam=5)
    assert shrinks, "no sentence finished before the others: the test would not cover a shrink"


# -- the real model ------------------------------------------------------------------
@pytest.mark.skipif(
    not (MULTI30K / "checkpoint_best.pt").exists(), reason="Multi30k model not present"
)
def test_multi30k_identical_hypotheses():
    os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(MULTI30K / "checkpoint_best.pt")], arg_overrides={"data": str(MULTI30K / "data-bin")}
    )
    ref = models[0].eval()
    model = copy.deepcopy(ref)
    ok, why = optimize_fairseq_model(model)
    assert ok, why
    task.load_dataset("test")
    ds = task.dataset("test")
    batch = ds.collater([ds[i] for i in range(50)])
    d = task.target_dictionary
    gen = lambda m: SequenceGenerator([m], d, beam_size=5).forward(batch)  # noqa: E731
    with torch.no_grad():
        h_ref, h_fused = gen(ref), gen(model)
    n = 0
    for a, b in zip(h_ref, h_fused):
        for x, y in zip(a, b):
            assert torch.equal(x["tokens"], y["tokens"])
            assert_close(y["score"], x["score"], "score")
            n += 1
    assert n == 250


# -- cache memory ------------------------------------------------------------------
def _gathered(cache):
    """Each logical row's K/V and key padding per slot, read through the table."""
    k, v, rows, pad = cache.views()
    slots = torch.arange(cache.length).view(1, -1).expand_as(rows[:, : cache.length])
    r = rows[:, : cache.length]
    return k[slots, r], v[slots, r], pad[r, slots]


def test_self_attn_cache_growth_and_repack_keep_values(monkeypatch):
    """Growth by a quarter (not doubling) and repacks on a shrink to half the
    physical rows free memory without changing a value any row reads."""
    monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 0)  # every shrink to half repacks
    g = torch.Generator().manual_seed(0)
    c, beam, sents = 6, 3, 8
    rows = beam * sents
    like = torch.empty(0)
    cache = kv_cache.SelfAttnCache(rows, kv_cache.INITIAL_SLOTS, c, like)
    hist_kv, hist_pad = [[] for _ in range(rows)], [[] for _ in range(rows)]
    caps, live = [], list(range(sents))
    for step in range(40):
        n = len(live) * beam
        kv_new = torch.randn(1, n, 2 * c, generator=g)
        pad_new = torch.rand(n, 1, generator=g) < 0.2
        cache.append(kv_new, pad_new)
        for r in range(n):
            hist_kv[r].append(kv_new[0, r])
            hist_pad[r].append(bool(pad_new[r, 0]))
        k, v, pad = _gathered(cache)
        want = torch.stack([torch.stack(h) for h in hist_kv[:n]])  # [n, L, 2C]
        assert torch.equal(k, want[..., :c]) and torch.equal(v, want[..., c:]), step
        assert pad.tolist() == [h for h in hist_pad[:n]], step
        caps.append(cache.capacity)
        # reorder inside beams; drop sentences at steps 10 and 20
        if step in (10, 20):
            live = live[: max(1, len(live) // 2 - (step == 20))]
        order = []
        for si in range(len(live)):
            order += (si * beam + torch.randint(0, beam, (beam,), generator=g)).tolist()
        cache.reorder(torch.tensor(order))
        hist_kv = [list(hist_kv[i]) for i in order] + [[] for _ in range(rows - len(order))]
        hist_pad = [list(hist_pad[i]) for i in order] + [[] for _ in range(rows - len(order))]
    slot_caps = sorted({cap[1] for cap in caps})
    expect = [kv_cache.INITIAL_SLOTS]
    while expect[-1] < 40:
        expect.append(kv_cache.next_slots(expect[-1] + 1, expect[-1]))
    assert slot_caps == expect  # 8, 12, 16, 20, 25, 31, 38, 47: a quarter, not doubling
    row_caps = [cap[0] for cap in caps]
    assert row_caps[0] == rows and row_caps[11] == 4 * beam and row_caps[-1] == beam


def test_cross_attn_cache_repack_on_shrink(monkeypatch):
    monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", 0)  # every shrink to half repacks
    g = torch.Generator().manual_seed(1)
    s, sents, beam, c = 5, 6, 2, 4
    kv = torch.randn(s, sents, 2 * c, generator=g)
    pad = torch.rand(sents, s, generator=g) < 0.3
    cache = kv_cache.CrossAttnCache(kv, pad, beam, beam)
    keep = [4, 1]  # 6 -> 2 sentences: half or less, the K/V are repacked
    order = torch.tensor([r for si in keep for r in (si * beam, si * beam + 1)])
    cache.reorder(order)
    k, v, mapping, p = cache.views()
    assert cache.kv.size(1) == 2 and mapping.tolist() == [0, 1]
    assert torch.equal(k, kv[:, keep, :c]) and torch.equal(v, kv[:, keep, c:])
    assert torch.equal(p, pad[keep])


def _shrunk_self_cache(rows: int, keep: int, c: int, steps: int):
    """A self-attention cache of ``rows`` rows with ``steps`` slots written,
    the order that keeps its first ``keep`` rows (reversed), and what each
    row of that order reads before any reorder."""
    g = torch.Generator().manual_seed(rows + keep)
    cache = kv_cache.SelfAttnCache(rows, steps, c, torch.empty(0))
    for _ in range(steps):
        cache.append(
            torch.randn(1, rows, 2 * c, generator=g), torch.rand(rows, 1, generator=g) < 0.2
        )
    order = torch.arange(keep - 1, -1, -1)
    want = [t[order] for t in _gathered(cache)]
    return cache, order, want


def test_a_repack_needs_to_free_enough(monkeypatch):
    """A shrink to half the rows or less repacks a cache only when that frees
    at least REPACK_MIN_BYTES (self- and cross-attention caches alike);
    either way every kept row reads the same values."""
    rows, keep, c, steps = 12, 5, 4, 6
    freed = (rows - keep) * steps * 2 * c * 4  # float32 K/V of the dropped rows
    for threshold, repacks in ((freed, True), (freed + 1, False), (0, True)):
        monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", threshold)
        cache, order, want = _shrunk_self_cache(rows, keep, c, steps)
        assert cache.repacks_at(keep) == repacks, threshold
        cache.reorder(order)
        assert cache.capacity[0] == (keep if repacks else rows), threshold
        got = _gathered(cache)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), threshold

    s, sents, beam = 5, 6, 2
    kv = torch.randn(s, sents, 2 * c)
    pad = torch.rand(sents, s) < 0.3
    keep_sents = [4, 1]
    order = torch.tensor([r for si in keep_sents for r in (si * beam, si * beam + 1)])
    freed = (sents - len(keep_sents)) * s * 2 * c * 4
    for threshold, repacks in ((freed, True), (freed + 1, False)):
        monkeypatch.setattr(kv_cache, "REPACK_MIN_BYTES", threshold)
        cache = kv_cache.CrossAttnCache(kv, pad, beam, beam)
        cache.reorder(order)
        assert cache.kv.size(1) == (len(keep_sents) if repacks else sents), threshold
        k, v, mapping, p = cache.views()
        assert torch.equal(k[:, mapping], kv[:, keep_sents, :c]), threshold
        assert torch.equal(v[:, mapping], kv[:, keep_sents, c:]), threshold
        assert torch.equal(p[mapping], pad[keep_sents]), threshold


def test_default_repack_threshold_sizes():
    """The default threshold at the Multi30k model's size (C = 256): a batch
    of 16 sentences (80 rows, 20 slots) halving keeps its cache, a batch of
    128 (640 rows, 8 slots) repacks."""
    c2_bytes = 2 * 256 * 4
    assert not kv_cache.repack_frees_enough(80 - 40, 20 * c2_bytes)
    assert kv_cache.repack_frees_enough(640 - 320, 8 * c2_bytes)


def test_rows_per_source_key_is_the_generators():
    from seqfuse.generation import sequence_generator

    assert sequence_generator.ROWS_PER_SOURCE == kv_cache.ROWS_PER_SOURCE


def _seqfuse_vs_stock(model, ref, d, src, beam, max_len_b=30):
    from seqfuse.generation import SequenceGenerator as SeqfuseGenerator

    sample = {"net_input": {"src_tokens": src, "src_lengths": src.ne(d.pad()).sum(1)}}
    with torch.no_grad():
        h1 = SequenceGenerator([ref], d, beam_size=beam, max_len_b=max_len_b).forward(sample)
        h2 = SeqfuseGenerator([model], d, beam_size=beam, max_len_b=max_len_b).forward(sample)
    for i, (a, b) in enumerate(zip(h1, h2)):
        assert len(a) == len(b)
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x["tokens"], y["tokens"]), (i, j)
            assert_close(y["score"], x["score"], f"score {i}/{j}")
            assert_close(y["positional_scores"], x["positional_scores"], f"pos {i}/{j}")
            assert_close(y["attention"], x["attention"], f"attention {i}/{j}")
    return h1


@pytest.mark.parametrize("beam", [1, 4])
def test_seqfuse_generator_gives_one_encoder_row_per_sentence(beam, monkeypatch):
    """With seqfuse's generator the fused decoder gets the encoder output once
    per sentence and keeps the cross-attention K/V once per sentence."""
    model, d = make_model(seed=1, pre_norm=True)
    ref = copy.deepcopy(model)
    assert optimize_fairseq_model(model)[0]
    seen = []
    orig = FusedTransformerDecoderLayer._cross_cache

    def spy(self, enc, enc_pad, n, incremental_state=None):
        cache = orig(self, enc, enc_pad, n, incremental_state)
        seen.append((enc.size(1), n, cache.kv.size(1), cache.q_per_kv, cache.later_q_per_kv))
        return cache

    monkeypatch.setattr(FusedTransformerDecoderLayer, "_cross_cache", spy)
    src = torch.randint(4, 60, (8, 10), generator=torch.Generator().manual_seed(3))
    src[6, :3] = d.pad()
    hypos = _seqfuse_vs_stock(model, ref, d, src, beam)
    assert len({len(h[0]["tokens"]) for h in hypos}) > 1  # batch shrinks happened
    # Beam search's first step decodes one row per sentence (the beams share
    # it), then `beam` query rows per sentence share the K/V.
    later = beam if beam > 1 else 0
    assert seen == [(8, 8, 8, 1, later)] * len(model.decoder.layers)


def test_fused_decoder_fallback_repeats_a_per_source_encoder_output(monkeypatch):
    """Off the fast path the stock decoder runs: a per-source encoder output is
    repeated for it, so the result equals the repeated input's."""
    model, d = make_model(seed=2)
    assert optimize_fairseq_model(model)[0]
    dec = model.decoder
    assert dec.takes_encoder_out_per_source()
    monkeypatch.setattr(type(dec), "_fast_path_problem", lambda self: "forced")
    assert not dec.takes_encoder_out_per_source()
    beam = 3
    src = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        enc = model.encoder(src, torch.tensor([7, 7]))
        reps = model.encoder.reorder_encoder_out(enc, torch.arange(2).repeat_interleave(beam))
        tokens = torch.randint(4, 60, (2 * beam, 3), generator=torch.Generator().manual_seed(5))
        st_a, st_b = {kv_cache.ROWS_PER_SOURCE: beam}, {}
        for t in range(1, 4):
            a = dec(tokens[:, :t], encoder_out=enc, incremental_state=st_a)[0]
            b = dec(tokens[:, :t], encoder_out=reps, incremental_state=st_b)[0]
            assert torch.equal(a, b), t


def _generation_peak(gen, model, sample) -> int:
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark import generation_peak_bytes

    with torch.no_grad():
        gen.generate([model], sample)  # warm-up (packed weights, position tables)
        return generation_peak_bytes(lambda: gen.generate([model], sample))[1]


def test_fused_generation_memory_well_below_stock():
    """Beam 5 on a model whose caches dominate: seqfuse's generator with the
    fused layers peaks at under half the memory of stock's generation."""
    from seqfuse.generation import SequenceGenerator as SeqfuseGenerator

    model, d = make_model(seed=1, dim=64, d=make_dict(300), eos_boost=6.0)
    ref = copy.deepcopy(model)
    assert optimize_fairseq_model(model)[0]
    src = torch.randint(4, len(d), (16, 30), generator=torch.Generator().manual_seed(3))
    src[:, -1] = d.eos()
    sample = {"net_input": {"src_tokens": src, "src_lengths": torch.full((16,), 30)}}
    kw = dict(beam_size=5, max_len_b=100)
    stock = _generation_peak(SequenceGenerator([ref], d, **kw), ref, sample)
    fused = _generation_peak(SeqfuseGenerator([model], d, **kw), model, sample)
    assert 0 < fused < 0.55 * stock, (fused, stock)
