"""The beam search's per-step bookkeeping in one C++ call (``hf_beam_advance``)
and the fused top-k's checks in one pass (``beam_topk_checks``).

The op is held to transformers' own helpers, run in the same test on the same
state, bit for bit, on random states built to hold what decides the order
(tied scores, the -1e9 fills, finished sentences, every early_stopping mode
and several length penalties); generate with the op is held to stock
transformers' generate.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import KINDS, make_inputs, make_model  # noqa: E402

import seqfuse  # noqa: E402
from integrations import hf  # noqa: E402
from seqfuse import _ext  # noqa: E402

pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the compiled extension")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for k in ("SEQFUSE_DISABLE", "SEQFUSE_FUSED_LAYERS", hf.BEAM_ADVANCE_ENV):
        monkeypatch.delenv(k, raising=False)
    hf._warned.clear()
    for k in hf.STATS:
        hf.STATS[k] = 0
    yield


class _Helpers:
    """An object whose helpers are GenerationMixin's (they call self._gather_beams)."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin as G

        self._gather_beams = G._gather_beams
        self.G = G

    def step(self, st, cur_len, prompt_len, max_length, num_beams, length_penalty, early_stopping):
        """transformers' helpers on a copy of the state, as seqfuse's loop calls them."""
        G = self.G
        s = {k: v.clone() for k, v in st.items()}
        w, wb = cur_len + 1, cur_len - prompt_len + 1
        trbi = G._gather_beams(s["run_bi"][:, :, :wb], s["beams"])
        trs = G._gather_beams(s["run"][:, :, :w], s["beams"])
        trs[:, :, cur_len] = s["tokens"]
        trbi[:, :, cur_len - prompt_len] = s["beams"] + s["offset"]
        run_seq, run_scores, run_bi = G._get_running_beams_for_next_iteration(
            self, s["lp"], trs, trbi, s["hits"], num_beams
        )
        seqs, scores, bi, fin = G._update_finished_beams(
            self,
            s["seq"][:, :, :w],
            trs,
            s["scores"],
            s["lp"],
            s["bi"][:, :, :wb],
            trbi,
            s["unsat"],
            s["fin"],
            s["hits"],
            s["top_mask"],
            num_beams,
            cur_len,
            prompt_len,
            length_penalty,
            early_stopping,
        )
        s["run"][:, :, :w].copy_(run_seq)
        s["run_bi"][:, :, :wb].copy_(run_bi)
        s["seq"][:, :, :w].copy_(seqs)
        s["bi"][:, :, :wb].copy_(bi)
        unsat = G._check_early_stop_heuristic(
            s["unsat"],
            run_scores,
            scores,
            fin,
            cur_len + 1,
            max_length,
            prompt_len,
            early_stopping,
            length_penalty,
        )
        go_on = bool(G._beam_search_has_unfinished_sequences(unsat, fin, s["hits"], early_stopping))
        beam_idx = run_bi[..., cur_len - prompt_len].reshape(-1)
        return s, (run_scores, scores, fin, unsat, beam_idx, go_on)


def _random_state(g, batch, num_beams, keep, cur_len, prompt_len, max_length, vocab=50):
    def ints(hi, *shape, dtype=torch.int64):
        return torch.randint(0, hi, shape, generator=g).to(dtype)

    # scores on a coarse grid (ties), some of them -1e9 fills
    lp = -(ints(8, batch, keep).float() * 0.5)
    lp = lp.sort(dim=1, descending=True).values  # the top-k's order
    scores = -(ints(6, batch, num_beams).float() * 0.25)
    scores[torch.rand(batch, num_beams, generator=g) < 0.4] = -1.0e9
    fin = torch.rand(batch, num_beams, generator=g) < 0.5
    return {
        "lp": lp,
        "tokens": ints(vocab, batch, keep),
        "beams": ints(num_beams, batch, keep),
        "hits": torch.rand(batch, keep, generator=g) < 0.3,
        "run": ints(vocab, batch, num_beams, max_length),
        "seq": ints(vocab, batch, num_beams, max_length),
        "run_bi": ints(
            batch * num_beams, batch, num_beams, max_length - prompt_len, dtype=torch.int32
        ),
        "bi": ints(batch * num_beams, batch, num_beams, max_length - prompt_len, dtype=torch.int32),
        "scores": scores,
        "fin": fin,
        "unsat": torch.rand(batch, 1, generator=g) < 0.8,
        "offset": torch.arange(batch).view(-1, 1) * num_beams,
        "top_mask": torch.cat(
            (
                torch.ones(num_beams, dtype=torch.bool),
                torch.zeros(keep - num_beams, dtype=torch.bool),
            )
        ),
    }


def _same(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _strided(t):
    """``t`` as a view into a wider buffer (the op's ATen form takes it)."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype)
    wide[..., : t.shape[-1]] = t
    return wide[..., : t.shape[-1]]


# "loops": the CPU form (contiguous buffers); "aten": the ATen calls (any
# other layout, and every other device)
@pytest.mark.parametrize("form", ("loops", "aten"))
@pytest.mark.parametrize("early_stopping", (True, False, "never"))
@pytest.mark.parametrize("length_penalty", (1.0, 0.0, -0.7, 2, 1.3))
def test_op_is_the_helpers_bit_for_bit(early_stopping, length_penalty, form):
    helpers = _Helpers()
    g = torch.Generator().manual_seed(hash((str(early_stopping), length_penalty)) % 2**31)
    code = hf._early_stopping_code(early_stopping)
    for case in range(40):
        batch, num_beams = 1 + case % 4, 1 + case % 5
        keep = num_beams * (2 + case % 2)
        prompt_len = case % 3
        max_length = prompt_len + 12
        cur_len = prompt_len + case % 11
        st = _random_state(g, batch, num_beams, keep, cur_len, prompt_len, max_length)
        want_state, want = helpers.step(
            st, cur_len, prompt_len, max_length, num_beams, length_penalty, early_stopping
        )
        s = {k: v.clone() for k, v in st.items()}
        if form == "aten":
            for name in ("run", "seq", "run_bi", "bi"):
                s[name] = _strided(s[name])
        got = torch.ops.seqfuse.hf_beam_advance(
            s["lp"], s["tokens"], s["beams"], s["hits"], s["run"], s["seq"], s["run_bi"],
            s["bi"], s["scores"], s["fin"], s["unsat"], s["offset"],
            s["top_mask"], cur_len, prompt_len, max_length, num_beams, float(length_penalty),
            code,
        )  # fmt: skip
        what = f"case {case}"
        for name, x, y in zip(("running", "scores", "fin", "unsat", "beam_idx"), got[:5], want[:5]):
            assert _same(x, y), f"{what}: {name}\n{x}\n{y}"
        assert got[5] == want[5], f"{what}: go on"
        for name in ("run", "seq", "run_bi", "bi"):
            assert _same(s[name], want_state[name]), f"{what}: buffer {name}"


def test_op_checks_its_arguments():
    st = _random_state(torch.Generator().manual_seed(0), 2, 2, 4, 3, 0, 8)
    args = [st[k] for k in ("lp", "tokens", "beams", "hits", "run", "seq", "run_bi", "bi")]
    args += [st[k] for k in ("scores", "fin", "unsat", "offset", "top_mask")]
    op = torch.ops.seqfuse.hf_beam_advance
    with pytest.raises(RuntimeError, match="outside the buffers"):
        op(*args, 8, 0, 8, 2, 1.0, 0)
    with pytest.raises(RuntimeError, match="early_stopping"):
        op(*args, 3, 0, 8, 2, 1.0, 3)
    with pytest.raises(RuntimeError, match="float32"):
        op(st["lp"].double(), *args[1:], 3, 0, 8, 2, 1.0, 0)


@pytest.mark.parametrize(
    "opts",
    (
        dict(),
        dict(early_stopping=True),
        dict(early_stopping="never", length_penalty=1.5),
        dict(length_penalty=-1.0, num_return_sequences=2),
        dict(length_penalty=0.0, early_stopping=True, min_new_tokens=3),
    ),
    ids=("default", "early", "never", "negative-lp", "lp0-early-min"),
)
@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_the_op_is_stock(kind, opts):
    model = make_model(kind, seed=3)
    ids, mask = make_inputs(kind, model, batch=5, seed=3)
    kw = dict(num_beams=4, max_new_tokens=16, attention_mask=mask, **opts)
    with torch.no_grad():
        # output_scores: stock's top-k each step, the op's bookkeeping;
        # without: the fused top-k as well
        stock = model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
        stock_plain = model.generate(ids, **kw)
        seqfuse.optimize(model)
        try:
            ours = model.generate(ids, return_dict_in_generate=True, output_scores=True, **kw)
            scored_steps = hf.STATS["advanced_steps"]
            ours_plain = model.generate(ids, **kw)
        finally:
            hf.restore(model)
    assert scored_steps > 0, "the op never ran"
    assert hf.STATS["fused_steps"] > 0 and hf.STATS["advanced_steps"] > scored_steps
    what = f"{kind} {opts}"
    assert torch.equal(stock.sequences, ours.sequences), f"{what}: sequences"
    assert torch.equal(stock.sequences_scores, ours.sequences_scores), f"{what}: scores"
    assert torch.equal(stock.beam_indices, ours.beam_indices), f"{what}: beam indices"
    assert torch.equal(stock_plain, ours_plain), f"{what}: sequences (fused top-k)"


def test_switch_and_overrides_keep_the_helpers(monkeypatch):
    kind = "marian"
    model = make_model(kind, seed=1)
    ids, mask = make_inputs(kind, model, batch=3, seed=1)
    kw = dict(num_beams=3, max_new_tokens=10, attention_mask=mask)
    with torch.no_grad():
        stock = model.generate(ids, **kw)
    seqfuse.optimize(model)
    try:
        monkeypatch.setenv(hf.BEAM_ADVANCE_ENV, "0")
        with torch.no_grad():
            off = model.generate(ids, **kw)
        assert hf.STATS["advanced_steps"] == 0
        monkeypatch.delenv(hf.BEAM_ADVANCE_ENV)
        # an instance's own helper (a user's or a spy) is called, not mirrored
        calls = []
        orig = model._update_finished_beams

        def spy(*a, **k):
            calls.append(1)
            return orig(*a, **k)

        model._update_finished_beams = spy
        with torch.no_grad():
            spied = model.generate(ids, **kw)
        del model._update_finished_beams
        assert calls and hf.STATS["advanced_steps"] == 0
        # a transformers whose helper has another shape: the helpers run
        monkeypatch.setitem(hf._ADVANCE_SHAPES, "_update_finished_beams", "0" * 16)
        with torch.no_grad():
            other = model.generate(ids, **kw)
        assert hf.STATS["advanced_steps"] == 0
        monkeypatch.undo()
        with torch.no_grad():
            on = model.generate(ids, **kw)
        assert hf.STATS["advanced_steps"] > 0
    finally:
        hf.restore(model)
    for out in (off, spied, other, on):
        assert torch.equal(out, stock)


def test_why_not_advance_names_the_reason(monkeypatch):
    import copy

    model = make_model("bart", seed=0)
    gc = copy.deepcopy(model.generation_config)
    gc.length_penalty = 1.0  # (what generate's prepared config holds by default)
    assert hf._why_not_advance(model, gc) is None
    gc.length_penalty = torch.tensor(1.0)
    assert "length_penalty" in hf._why_not_advance(model, gc)
    monkeypatch.setenv(hf.BEAM_ADVANCE_ENV, "0")
    assert hf.BEAM_ADVANCE_ENV in hf._why_not_advance(model, gc)


def _checks_reference(logits, cum, cs):
    bad = bool(~torch.isfinite(logits.amax(dim=1)).all() | torch.isnan(cum).any())
    tie = (cs[:, 1:] == cs[:, :-1]).any(dim=1)
    return bad, tie


@pytest.mark.parametrize("poison", ("none", "nan", "inf", "all-neg-inf", "one-neg-inf", "nan-cum"))
def test_topk_checks_are_the_python_checks(poison):
    g = torch.Generator().manual_seed(7)
    # (the last two: enough logits for the rows to be shared among threads;
    # the poisoned row last, then in the middle)
    shapes = ((5, 211, 11), (20, 1000, 9), (1, 3, 1), (8, 64, 2), (80, 8003, 10), (33, 4099, 3))
    for rows, vocab, k in shapes:
        logits = torch.randn(rows, vocab, generator=g)
        cum = torch.randn(rows, generator=g)
        cs = (torch.randn(max(1, rows // 4), k, generator=g) * 2).round() / 2  # ties
        r = rows // 2 if rows == 33 else rows - 1
        if poison == "nan":
            logits[r, vocab // 2] = float("nan")
        elif poison == "inf":
            logits[r, 0] = float("inf")
        elif poison == "all-neg-inf":
            logits[r] = float("-inf")
        elif poison == "one-neg-inf":
            logits[r, 1 % vocab] = float("-inf")
        elif poison == "nan-cum":
            cum[r] = float("nan")
        bad, tie = torch.ops.seqfuse.beam_topk_checks(logits, cum, cs)
        want_bad, want_tie = _checks_reference(logits, cum, cs)
        assert bad == want_bad, (poison, rows, vocab)
        assert torch.equal(tie, want_tie), (poison, rows, vocab)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.seqfuse.beam_topk_checks(logits.t(), cum, cs)
