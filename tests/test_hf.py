"""seqfuse.optimize on Hugging Face models: same tokens and scores as stock
``model.generate`` (run in the same test on the same model), fallbacks with
one warning line, and the patch's API.

Each parity test runs stock generate, then ``seqfuse.optimize`` on the same
model and generate again, and compares the returned sequences, the running
beam scores of every step and the final finished-beam scores bit for bit
(spied on the per-step helpers both loops call).
"""

from __future__ import annotations

import argparse
import logging
import os

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import DECODER_ONLY, KINDS, MORE_KINDS, make_inputs, make_model  # noqa: E402

import seqfuse  # noqa: E402
from integrations import hf  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("SEQFUSE_DISABLE", raising=False)
    hf._warned.clear()
    for k in hf.STATS:
        hf.STATS[k] = 0
    yield


class Trace:
    """Spies on the per-step helpers that stock's loop and seqfuse's both call."""

    def __init__(self, model):
        self.running, self.finished = [], []
        run, fin = model._get_running_beams_for_next_iteration, model._update_finished_beams

        def running(*a, **kw):
            out = run(*a, **kw)
            self.running.append(out[1].clone())
            return out

        def finished(*a, **kw):
            out = fin(*a, **kw)
            self.finished.append(out[1].clone())
            return out

        model._get_running_beams_for_next_iteration = running
        model._update_finished_beams = finished
        self.model = model

    def close(self):
        del self.model._get_running_beams_for_next_iteration
        del self.model._update_finished_beams


def generate(model, ids, **kw):
    trace = Trace(model)
    try:
        with torch.no_grad():
            out = model.generate(ids, **kw)
    finally:
        trace.close()
    return out, trace


def same(x, y) -> bool:
    """Equal values, bit for bit where finite; NaN where the other has NaN."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.is_floating_point():
        nan = torch.isnan(x)
        return torch.equal(nan, torch.isnan(y)) and torch.equal(x[~nan], y[~nan])
    return torch.equal(x, y)


def assert_same(stock, ours, what=""):
    (a, ta), (b, tb) = stock, ours
    sa = a if isinstance(a, torch.Tensor) else a.sequences
    sb = b if isinstance(b, torch.Tensor) else b.sequences
    assert torch.equal(sa, sb), f"{what}: sequences differ\n{sa}\n{sb}"
    assert len(ta.running) == len(tb.running), f"{what}: step counts differ"
    for i, (x, y) in enumerate(zip(ta.running, tb.running)):
        assert same(x, y), f"{what}: running beam scores differ at step {i}"
    for i, (x, y) in enumerate(zip(ta.finished, tb.finished)):
        assert same(x, y), f"{what}: finished beam scores differ at step {i}"
    if not isinstance(a, torch.Tensor):
        for name in ("sequences_scores", "beam_indices"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None) == (y is None), name
            if x is not None:
                assert same(x, y), f"{what}: {name} differ"
        for name in (
            "decoder_attentions",
            "cross_attentions",
            "attentions",
            "decoder_hidden_states",
            "encoder_hidden_states",
            "hidden_states",
        ):
            x, y = getattr(a, name, None), getattr(b, name, None)
            assert (x is None) == (y is None), name
            if x is not None:
                flat_x = [t for step in x for t in step]
                flat_y = [t for step in y for t in step]
                assert len(flat_x) == len(flat_y) and all(map(same, flat_x, flat_y)), name
        if a.scores is not None:
            assert len(a.scores) == len(b.scores)
            for x, y in zip(a.scores, b.scores):
                assert same(x, y), f"{what}: per-step scores differ"


def stock_then_seqfuse(model, ids, **kw):
    stock = generate(model, ids, **kw)
    assert not hf.is_optimized(model)
    seqfuse.optimize(model)
    try:
        ours = generate(model, ids, **kw)
    finally:
        hf.restore(model)
    return stock, ours


def eos_lengths(kind, model, ids, out):
    seqs = out if isinstance(out, torch.Tensor) else out.sequences
    gen = seqs[:, ids.shape[1] :] if kind in DECODER_ONLY else seqs[:, 1:]
    eos = model.config.eos_token_id
    return {int((r == eos).nonzero()[0]) + 1 if (r == eos).any() else -1 for r in gen}


@pytest.mark.parametrize("seed", (0, 1))
@pytest.mark.parametrize("num_beams", (2, 4, 5))
@pytest.mark.parametrize("kind", KINDS)
def test_parity_default_options(kind, num_beams, seed):
    model = make_model(kind, seed=seed)
    ids, mask = make_inputs(kind, model, batch=5, seed=seed)
    kw = dict(num_beams=num_beams, max_new_tokens=20, attention_mask=mask)
    stock, ours = stock_then_seqfuse(model, ids, **kw)
    assert_same(stock, ours, f"{kind} beams={num_beams} seed={seed}")
    assert hf.STATS["fused_steps"] > 0, "the fused step never ran"
    if kind not in DECODER_ONLY:
        assert hf.STATS["cross_cache_kept"] == 1, "the cross-attention cache was re-gathered"


@pytest.mark.parametrize("option", ("default", "min_length", "scores"))
@pytest.mark.parametrize("kind", MORE_KINDS)
def test_parity_more_architectures(kind, option):
    model = make_model(kind, seed=2)
    ids, mask = make_inputs(kind, model, batch=4, seed=2)
    kw = dict(num_beams=4, max_new_tokens=14, attention_mask=mask)
    kw.update(
        {"default": {}, "min_length": dict(min_new_tokens=5), "scores": OPTIONS["scores"]}[option]
    )
    stock, ours = stock_then_seqfuse(model, ids, **kw)
    assert_same(stock, ours, f"{kind} {option}")
    assert (hf.STATS["fused_steps"] > 0) == (option != "scores")


def test_hypotheses_end_at_different_lengths():
    """The fixture models are useful parity cases: EOS at varied steps."""
    for kind in KINDS:
        model = make_model(kind)
        ids, mask = make_inputs(kind, model, batch=8)
        with torch.no_grad():
            out = model.generate(ids, num_beams=4, max_new_tokens=24, attention_mask=mask)
        assert len(eos_lengths(kind, model, ids, out)) >= 2, kind


OPTIONS = {
    "lenpen_0.6": dict(length_penalty=0.6),
    "lenpen_2": dict(length_penalty=2.0),
    "lenpen_neg": dict(length_penalty=-0.5),
    "early_true": dict(early_stopping=True),
    "early_never": dict(early_stopping="never", length_penalty=1.5),
    "min_length": dict(min_length=8),
    "min_new_tokens": dict(min_new_tokens=6),
    "nret_3": dict(num_return_sequences=3),
    "suppress": dict(suppress_tokens=[5, 6, 7, 8]),
    "begin_suppress": dict(begin_suppress_tokens=[9, 10]),
    "bad_words_1": dict(bad_words_ids=[[11], [12]]),
    "bad_words_multi": dict(bad_words_ids=[[13, 14], [15]]),
    "no_repeat_2": dict(no_repeat_ngram_size=2),
    "repetition": dict(repetition_penalty=1.3),
    "short": dict(max_new_tokens=3),
    "scores": dict(return_dict_in_generate=True, output_scores=True),
    "dict_no_scores": dict(return_dict_in_generate=True, output_logits=True),
    "hidden": dict(return_dict_in_generate=True, output_hidden_states=True),
    "no_cache": dict(use_cache=False),
    "attentions": dict(return_dict_in_generate=True, output_attentions=True),
    "custom_stop": "custom_stop",
}

# Options whose processors are token bans: the fused op must run every step
# but the forced-token ones.
FUSED = {
    "lenpen_0.6",
    "lenpen_2",
    "lenpen_neg",
    "early_true",
    "early_never",
    "min_length",
    "min_new_tokens",
    "nret_3",
    "suppress",
    "begin_suppress",
    "bad_words_1",
    "short",
    "dict_no_scores",
    "hidden",
    "no_cache",
    "custom_stop",
    "attentions",
}


def _custom_stop():
    """A user's stopping criterion (token 17 ends a hypothesis): seqfuse calls
    it on the gathered sequences, as stock does."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Token17(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == 17

    return dict(stopping_criteria=StoppingCriteriaList([Token17()]))


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", ("marian", "mbart", "t5", "gpt2"))
def test_parity_options(kind, option):
    model = make_model(kind, seed=3)
    ids, mask = make_inputs(kind, model, batch=4, seed=3)
    kw = dict(num_beams=4, max_new_tokens=16, attention_mask=mask)
    kw.update(_custom_stop() if OPTIONS[option] == "custom_stop" else OPTIONS[option])
    stock, ours = stock_then_seqfuse(model, ids, **kw)
    assert_same(stock, ours, f"{kind} {option}")
    if option in FUSED:
        assert hf.STATS["fused_steps"] > 0
    else:
        assert hf.STATS["fused_steps"] == 0, "a non-ban processor ran through the fused op"


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("kind", ("marian", "t5", "llama"))
def test_half_precision_models_on_cpu(kind, dtype):
    """bf16/fp16 weights: stock casts the logits to fp32 before its log-softmax;
    the fused step reads the same fp32 logits, so the results stay stock's."""
    model = make_model(kind, seed=4).to(dtype)
    ids, mask = make_inputs(kind, model, batch=3, seed=4)
    stock, ours = stock_then_seqfuse(
        model, ids, num_beams=4, max_new_tokens=10, attention_mask=mask
    )
    assert_same(stock, ours, f"{kind} {dtype}")
    assert hf.STATS["fused_steps"] > 0


def test_decoder_only_from_inputs_embeds():
    model = make_model("llama", seed=8)
    ids, mask = make_inputs("llama", model, batch=3, seed=8)
    embeds = model.get_input_embeddings()(ids).detach()
    stock, ours = stock_then_seqfuse(
        model, None, inputs_embeds=embeds, attention_mask=mask, num_beams=3, max_new_tokens=10
    )
    assert_same(stock, ours, "inputs_embeds")
    assert hf.STATS["fused_steps"] > 0


def test_batch_of_one_and_larger_vocab():
    model = make_model("bart", seed=5, vocab=5125)
    ids, mask = make_inputs("bart", model, batch=1, seed=5)
    stock, ours = stock_then_seqfuse(
        model, ids, num_beams=5, max_new_tokens=12, attention_mask=mask
    )
    assert_same(stock, ours, "bart vocab 5125 batch 1")


def test_exact_ties_are_ranked_as_stock():
    """Duplicated output rows give exactly equal scores: the order among them
    is torch.topk's, which seqfuse reproduces by re-ranking with stock's ops."""
    model = make_model("mbart", seed=2)
    head = model.get_output_embeddings()
    with torch.no_grad():
        for src in range(3, 60):
            head.weight[src + 100] = head.weight[src]
            head.bias[src + 100] = head.bias[src]
    ids, mask = make_inputs("mbart", model, batch=4, seed=2)
    stock, ours = stock_then_seqfuse(
        model, ids, num_beams=4, max_new_tokens=12, attention_mask=mask
    )
    assert_same(stock, ours, "ties")
    assert hf.STATS["tie_reranks"] > 0, "no tie reached the re-ranking"


def test_non_finite_logits_take_stock_ops():
    """NaN logits (fp16 overflow, a broken model): stock's operations decide."""
    model = make_model("marian", seed=1)
    calls = {"n": 0}

    def poison(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 3:
            output = output.clone()
            output[1, -1, 4] = float("nan")
        return output

    handle = model.get_output_embeddings().register_forward_hook(poison)
    try:
        ids, mask = make_inputs("marian", model, batch=3, seed=1)
        stock = generate(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
        calls["n"] = 0
        seqfuse.optimize(model)
        ours = generate(model, ids, num_beams=3, max_new_tokens=8, attention_mask=mask)
    finally:
        handle.remove()
        hf.restore(model)
    assert_same(stock, ours, "nan")
    assert hf.STATS["stock_steps"] >= 1


def test_fallbacks_warn_once_and_match_stock(caplog):
    model = make_model("bart", seed=4)
    ids, mask = make_inputs("bart", model, batch=3, seed=4)
    seqfuse.optimize(model)
    try:
        with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
            torch.manual_seed(7)
            ours = model.generate(
                ids, num_beams=3, do_sample=True, max_new_tokens=8, attention_mask=mask
            )
            torch.manual_seed(7)
            model.generate(ids, num_beams=3, do_sample=True, max_new_tokens=8, attention_mask=mask)
            greedy = model.generate(ids, num_beams=1, max_new_tokens=8, attention_mask=mask)
    finally:
        hf.restore(model)
    lines = [r.getMessage() for r in caplog.records if r.name == "seqfuse.hf"]
    # (greedy search runs seqfuse's loop with direct steps: no line for it)
    assert len(lines) == 1, lines
    assert all(line.startswith(hf.FALLBACK_PREFIX) for line in lines)
    assert "do_sample" in lines[0]
    assert hf.STATS["fused_steps"] == 0
    torch.manual_seed(7)
    with torch.no_grad():
        stock = model.generate(
            ids, num_beams=3, do_sample=True, max_new_tokens=8, attention_mask=mask
        )
        assert torch.equal(stock, ours)
        assert torch.equal(
            model.generate(ids, num_beams=1, max_new_tokens=8, attention_mask=mask), greedy
        )


def test_disable_env_runs_stock_silently(monkeypatch, caplog):
    monkeypatch.setenv("SEQFUSE_DISABLE", "1")
    model = make_model("t5", seed=1)
    ids, mask = make_inputs("t5", model, batch=2, seed=1)
    stock, ours = None, None
    with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
        stock, ours = stock_then_seqfuse(
            model, ids, num_beams=3, max_new_tokens=6, attention_mask=mask
        )
    assert_same(stock, ours, "disabled")
    assert hf.STATS["fused_steps"] == 0 and not caplog.records


def test_optimize_api(tmp_path, caplog):
    from transformers import BartForConditionalGeneration, BertConfig, BertModel

    model = make_model("bart")
    assert seqfuse.optimize(model) is model
    assert seqfuse.optimize(model) is model  # idempotent
    assert hf.is_optimized(model)
    assert isinstance(model, BartForConditionalGeneration)
    assert type(model).__name__ == "BartForConditionalGeneration"
    model.save_pretrained(tmp_path)
    loaded = BartForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config.architectures == ["BartForConditionalGeneration"]
    assert not hf.is_optimized(loaded)
    assert hf.restore(model) is model and type(model) is BartForConditionalGeneration

    bert = BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    with caplog.at_level(logging.WARNING, logger="seqfuse.hf"):
        assert seqfuse.optimize(bert) is bert
    assert type(bert) is BertModel and not hf.is_optimized(bert)
    lines = [r.getMessage() for r in caplog.records if r.name == "seqfuse.hf"]
    assert len(lines) == 1 and "encoder-only" in lines[0], lines
    with pytest.raises(TypeError, match="PreTrainedModel"):
        seqfuse.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unexpected keyword"):
        seqfuse.optimize(model, fast=True)
    assert type(model) is BartForConditionalGeneration


# ------------------------------------------------ the real Multi30k model
SHARED_MODEL = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "models", "multi30k_en_de"
)


@pytest.fixture(scope="module")
def multi30k_fsmt():
    ckpt = os.path.join(SHARED_MODEL, "checkpoint_best.pt")
    if not os.path.exists(ckpt):
        pytest.skip("../shared/models/multi30k_en_de not present")
    pytest.importorskip("fairseq")
    from fairseq import checkpoint_utils

    from integrations.fairseq_to_hf import fsmt_from_fairseq
    from seqfuse import fairseq_plugin

    fairseq_plugin.install()
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": os.path.join(SHARED_MODEL, "data-bin")}
    )
    task.load_dataset("test")
    return fsmt_from_fairseq(ckpt), models[0].eval(), task.datasets["test"]


def test_fairseq_checkpoint_converts_to_the_same_network(multi30k_fsmt):
    from fairseq.data import data_utils

    hf_model, fs_model, ds = multi30k_fsmt
    for i in (0, 7, 30):
        src = ds.src[i][None]
        prev = data_utils.collate_tokens([ds.tgt[i]], 1, 2, move_eos_to_beginning=True)
        with torch.no_grad():
            want = fs_model(src, torch.tensor([src.shape[1]]), prev)[0]
            got = hf_model(input_ids=src, decoder_input_ids=prev, use_cache=False).logits
        assert (want - got).abs().max() < 1e-4


def test_converter_refuses_what_fsmt_cannot_express(tmp_path):
    from integrations.fairseq_to_hf import fsmt_from_fairseq

    args = argparse.Namespace(encoder_normalize_before=True, encoder_embed_dim=8)
    torch.save({"args": args, "model": {}}, tmp_path / "prenorm.pt")
    with pytest.raises(ValueError, match="pre-norm"):
        fsmt_from_fairseq(str(tmp_path / "prenorm.pt"))
    torch.save({"model": {}}, tmp_path / "nothing.pt")
    with pytest.raises(ValueError, match="not a fairseq checkpoint"):
        fsmt_from_fairseq(str(tmp_path / "nothing.pt"))


@pytest.mark.parametrize(
    "kw",
    (
        dict(num_beams=5),
        dict(num_beams=4, length_penalty=0.6, early_stopping=True),
        dict(num_beams=5, num_return_sequences=2, min_new_tokens=4, no_repeat_ngram_size=3),
    ),
    ids=("beam5", "lenpen_early", "nret_minnew_ngram"),
)
def test_multi30k_parity(multi30k_fsmt, kw):
    """Trained weights, real sentences, natural lengths: stock HF vs seqfuse."""
    from fairseq.data import data_utils

    hf_model, _, ds = multi30k_fsmt
    for start in (0, 16):
        src = data_utils.collate_tokens([ds.src[i] for i in range(start, start + 16)], 1, 2)
        mask = (src != 1).long()
        stock, ours = stock_then_seqfuse(
            hf_model, src, attention_mask=mask, max_new_tokens=60, **kw
        )
        assert_same(stock, ours, f"multi30k {kw} from {start}")
    if kw.get("no_repeat_ngram_size"):
        assert hf.STATS["fused_steps"] == 0
    else:
        assert hf.STATS["fused_steps"] > 0 and hf.STATS["cross_cache_kept"] == 2


@pytest.mark.parametrize("kind", ("marian", "gpt2"))
def test_logprob_input_path_matches_stock(monkeypatch, kind):
    """The path GPUs take (torch's log-probs into the fused bans + top-k),
    run here on the CPU."""
    monkeypatch.setattr(hf, "_kernel_normalises", lambda device: False)
    model = make_model(kind, seed=6)
    ids, mask = make_inputs(kind, model, batch=5, seed=6)
    stock, ours = stock_then_seqfuse(
        model, ids, num_beams=4, max_new_tokens=16, min_length=5, attention_mask=mask
    )
    assert_same(stock, ours, f"logprob path {kind}")
    assert hf.STATS["fused_steps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", ("marian", "bart", "t5", "gpt2"))
def test_cuda_parity(kind, dtype):
    """On a GPU, in every dtype: stock's tokens and scores, bit for bit (the
    log-probs are torch's; the kernel fuses bans, accumulation and top-k)."""
    model = make_model(kind, seed=1).to(device="cuda", dtype=dtype)
    ids, mask = make_inputs(kind, model, batch=6, seed=1)
    stock, ours = stock_then_seqfuse(
        model, ids.cuda(), num_beams=4, max_new_tokens=16, attention_mask=mask.cuda()
    )
    assert_same(stock, ours, f"cuda {kind} {dtype}")
    assert hf.STATS["fused_steps"] > 0


def test_text_generation_pipeline():
    """seqfuse.optimize(pipeline) patches its model: same generated text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    model = make_model("llama", seed=1)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", eos_token="w2", bos_token="w1", unk_token="w3"
    )
    pipe = pipeline("text-generation", model=model, tokenizer=fast)
    prompts = ["w5 w6 w7 w8", "w9 w10", "w11 w40 w41"]
    with torch.no_grad():
        stock = pipe(prompts, num_beams=4, max_new_tokens=8, do_sample=False)
        assert seqfuse.optimize(pipe) is pipe and hf.is_optimized(pipe.model)
        ours = pipe(prompts, num_beams=4, max_new_tokens=8, do_sample=False)
    assert hf.restore(pipe) is pipe and not hf.is_optimized(pipe.model)
    assert ours == stock
    assert hf.STATS["fused_steps"] > 0


@pytest.mark.parametrize("search", ("beam", "greedy"))
@pytest.mark.parametrize("pause", ("default", "off_by_env"))
def test_collector_paused_in_the_search_and_restored(monkeypatch, search, pause):
    """seqfuse's beam and greedy loops run with Python's cyclic collector paused
    and leave it on again after; SEQFUSE_GC_PAUSE=0 leaves it on. Same output
    as stock either way (greedy search is seqfuse's loop with fused layers)."""
    import gc

    from hf_models import needs_packed_gemm

    if search == "greedy" and needs_packed_gemm().args[0]:
        pytest.skip(needs_packed_gemm().kwargs["reason"])
    if pause == "off_by_env":
        monkeypatch.setenv("SEQFUSE_GC_PAUSE", "0")
    else:
        monkeypatch.delenv("SEQFUSE_GC_PAUSE", raising=False)
    # (the loop's forward calls are what it watches: no direct steps)
    monkeypatch.setenv("SEQFUSE_HF_DIRECT_STEP", "0")
    seen = []
    real = hf._forward

    def forward(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "_forward", forward)
    model = make_model("marian", seed=0)
    ids, mask = make_inputs("marian", model, batch=3, seed=0)
    kw = dict(max_new_tokens=8, attention_mask=mask, do_sample=False)
    was = gc.isenabled()
    gc.enable()
    try:
        if search == "beam":
            stock, ours = stock_then_seqfuse(model, ids, num_beams=4, **kw)
        else:
            with torch.no_grad():
                stock = model.generate(ids, num_beams=1, **kw)
                seqfuse.optimize(model, fused_layers=True)
                try:
                    ours = model.generate(ids, num_beams=1, **kw)
                finally:
                    hf.restore(model)
        after = gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    if search == "beam":
        assert_same(stock, ours, "beam search")
    else:
        assert torch.equal(stock, ours)
    assert seen, "seqfuse's loop did not run"
    assert set(seen) == {pause == "off_by_env"}, seen
    assert after


def test_processors_applied_as_the_list_applies_them(monkeypatch):
    """integrations.hf._apply_processors: each of transformers' processors in
    turn, the same scores as LogitsProcessorList's own call, without its
    inspect.signature at every call; a processor that wants more arguments, an
    instance's own __call__ or another list class get the list's call."""
    import inspect

    from transformers.generation import logits_process as lp

    torch.manual_seed(0)
    ids = torch.randint(3, 50, (4, 7))
    scores = torch.randn(4, 50)
    procs = lp.LogitsProcessorList(
        [
            lp.NoRepeatNGramLogitsProcessor(2),
            lp.RepetitionPenaltyLogitsProcessor(1.3),
            lp.NoBadWordsLogitsProcessor([[5], [7, 9]], eos_token_id=2),
            lp.MinNewTokensLengthLogitsProcessor(5, 9, eos_token_id=2),
        ]
    )
    want = procs(ids, scores.clone())
    assert torch.equal(hf._apply_processors(procs, ids, scores.clone()), want)
    calls = []
    real = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(hf._apply_processors(procs, ids, scores.clone()), want)
    assert not calls  # (the list's own call makes one per processor)

    class Needs(lp.LogitsProcessor):
        def __call__(self, input_ids, scores, extra):
            return scores + extra

    more = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.3), Needs()])
    with pytest.raises(ValueError, match="required parameters"):
        hf._apply_processors(more, ids, scores.clone())

    seen = []
    own = lp.RepetitionPenaltyLogitsProcessor(1.3)
    own.__call__ = lambda i, s: seen.append(1) or s  # an instance's own (the list ignores it)
    mixed = lp.LogitsProcessorList([own])
    assert torch.equal(hf._apply_processors(mixed, ids, scores.clone()), mixed(ids, scores.clone()))

    class MyList(lp.LogitsProcessorList):
        def __call__(self, input_ids, scores, **kwargs):
            return scores * 2

    assert torch.equal(hf._apply_processors(MyList(procs), ids, scores), scores * 2)


def test_greedy_tokens_from_bans_match_the_processors():
    """integrations.hf._greedy_tokens: with ban-type processors (single bad
    tokens, a minimum number of new tokens, suppressed tokens) the argmax of
    the logits with the banned columns at -inf is the processors' argmax;
    ties go to the first index as there; a NaN or infinite logit and a forced
    token run the processors."""
    from transformers.generation import logits_process as lp

    vocab = 40
    procs = lp.LogitsProcessorList(
        [
            lp.NoBadWordsLogitsProcessor([[5], [7]], eos_token_id=2),
            lp.MinNewTokensLengthLogitsProcessor(4, 3, eos_token_id=2),
            lp.SuppressTokensLogitsProcessor([9]),
        ]
    )
    plan = hf._StepPlan(procs, vocab)
    g = torch.Generator().manual_seed(3)
    for length in (4, 6, 9):  # min_new_tokens 3 after a prompt of 4: EOS banned at 4 and 6
        ids = torch.randint(0, vocab, (6, length), generator=g)
        logits = torch.randn(6, vocab, generator=g)
        for col in (2, 5, 7, 9):  # each banned column the row's largest in some row
            logits[col % 6, col] = 50.0
        logits[5, 11] = logits[5, 12] = 60.0  # a tie: the first index
        want = torch.argmax(procs(ids, logits.clone()), dim=-1)
        before = hf.STATS["greedy_bans"]
        assert torch.equal(hf._greedy_tokens(plan, procs, ids, logits.clone()), want)
        assert hf.STATS["greedy_bans"] == before + 1
    for bad in (float("nan"), float("inf")):  # at a banned column: the processors decide
        logits = torch.randn(6, vocab, generator=g)
        logits[1, 5] = bad
        ids = torch.randint(0, vocab, (6, 4), generator=g)
        want = torch.argmax(procs(ids, logits.clone()), dim=-1)
        before = hf.STATS["greedy_bans"]
        assert torch.equal(hf._greedy_tokens(plan, procs, ids, logits.clone()), want)
        assert hf.STATS["greedy_bans"] == before
    forced = lp.LogitsProcessorList([*procs, lp.ForcedEOSTokenLogitsProcessor(10, eos_token_id=2)])
    fplan = hf._StepPlan(forced, vocab)
    ids = torch.randint(0, vocab, (6, 9), generator=g)  # the step before max_length: EOS forced
    logits = torch.randn(6, vocab, generator=g)
    out = hf._greedy_tokens(fplan, forced, ids, logits.clone())
    assert out.tolist() == [2] * 6
    rep = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.5)])
    assert hf._StepPlan(rep, vocab).generic_reason is not None


@pytest.mark.parametrize("kind", ["marian", "gpt2", "llama"])
@pytest.mark.parametrize("fused", [False, True])
def test_greedy_with_ban_processors_is_stock(kind, fused):
    """Greedy search (seqfuse's loop) with bad single tokens, a minimum of new
    tokens and suppressed tokens: stock's sequences, the bans' argmax taken."""
    from hf_models import needs_packed_gemm

    from integrations import hf_direct

    if fused and needs_packed_gemm().args[0]:
        pytest.skip(needs_packed_gemm().kwargs["reason"])
    model = make_model(kind, seed=21)
    ids, mask = make_inputs(kind, model, batch=4, seed=21)
    kw = dict(num_beams=1, do_sample=False, max_new_tokens=12, min_new_tokens=5,
              bad_words_ids=[[7], [11]], suppress_tokens=[13], attention_mask=mask)  # fmt: skip
    with torch.no_grad():
        stock = model.generate(ids, **kw)
    seqfuse.optimize(model, fused_layers=fused)
    try:
        seqfuse_loop = fused or hf_direct.problem(model) is None
        with torch.no_grad():
            ours = model.generate(ids, **kw)
    finally:
        hf.restore(model)
    assert torch.equal(stock, ours)
    assert (hf.STATS["greedy_bans"] > 0) == seqfuse_loop
