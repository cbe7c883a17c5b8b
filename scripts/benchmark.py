"""Beam-search throughput, memory and BLEU: stock vs seqfuse vs peers, side by side.

Providers (each in its own worker process, so peak memory is per provider):
- ``fairseq``: stock ``fairseq.sequence_generator.SequenceGenerator``;
- ``seqfuse``: ``seqfuse.generation.SequenceGenerator`` with the seqfuse plugin
  imported before the model is built (what ``--user-dir`` does), stock layers;
- ``seqfuse-fused``: the same with ``SEQFUSE_FUSED_LAYERS=1`` (the plugin swaps
  in the fused encoder/decoder layers);
- ``hf``: stock Hugging Face ``generate`` on a ``MarianMTModel`` of the same
  shape (random weights; output length forced);
- ``ctranslate2``: the fairseq checkpoint converted with CTranslate2's fairseq
  converter (skipped when ctranslate2 is not installed);
- ``seqfuse-hf``: ``seqfuse.optimize`` on the same Marian model (HF generate, seqfuse's search).

Models: ``multi30k`` (the real model in ../shared/models/multi30k_en_de,
natural output lengths, BLEU on the first ``--sentences`` test sentences) and
``base`` (a transformer-base-sized fairseq model, 6+6 layers, d=512, 8 heads,
FFN 2048, 32k vocabulary, random weights, output length forced to
``--forced-len`` tokens; its checkpoint is written under benchmarks/work/).

For every model x device x dtype x batch x beam the providers run interleaved
(warm-up, then ``--repeats`` rounds of each provider in turn); medians are
reported. Timed runs are not instrumented. One more run measures the peak
memory of generation itself (``generation_peak_bytes``: on the CPU the torch
profiler's allocator events, on a GPU ``torch.cuda.max_memory_allocated``),
the largest over the ``generate`` calls of the run. Results: JSON + CSV + PNG
under ``--results-dir``.

    .venv/bin/python scripts/benchmark.py            # small CPU sweep, a few minutes
    .venv/bin/python scripts/benchmark.py --full     # batch 1/16/64/128 x beam 1/4/5
    .venv/bin/python scripts/benchmark.py --memory   # Multi30k batch 128 beam 5, with fused layers
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# seqfuse from this checkout, installed or not (a GPU machine runs it from the tree).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("SEQFUSE_SHARED", ROOT.parent / "shared"))
MULTI30K = SHARED / "models" / "multi30k_en_de"
MULTI30K_TEST_DE = SHARED / "data" / "multi30k" / "test_2016_flickr.de.gz"
WORK = ROOT / "benchmarks" / "work"
RESULTS = ROOT / "benchmarks" / "results"

PROVIDERS = ("fairseq", "seqfuse", "seqfuse-fused", "hf", "ctranslate2", "seqfuse-hf")
# The default --providers: seqfuse-fused (opt-in layers) is asked for by name or --memory.
DEFAULT_PROVIDERS = ("fairseq", "seqfuse", "hf", "ctranslate2", "seqfuse-hf")
FAIRSEQ_PROVIDERS = ("fairseq", "seqfuse", "seqfuse-fused")
MODELS = ("multi30k", "base")
BASE_SHAPE = dict(layers=6, dim=512, heads=8, ffn=2048, vocab=32000)
SMALL_SWEEP = dict(batch_sizes=[8, 32], beams=[1, 5], sentences=64, repeats=3)
FULL_SWEEP = dict(batch_sizes=[1, 16, 64, 128], beams=[1, 4, 5], sentences=1000, repeats=5)
MEMORY_SWEEP = dict(
    batch_sizes=[128],
    beams=[5],
    sentences=1000,
    repeats=3,
    models="multi30k",
    providers="fairseq,seqfuse,seqfuse-fused",
)
MARKER = "@@bench "


# --------------------------------------------------------------------------- models


def make_base_model(out_dir: Path = WORK / "base", seed: int = 1) -> Path:
    """A transformer-base-sized fairseq checkpoint with random weights.

    Built by fairseq's own ``TransformerModel.build_model`` from arguments and a
    synthetic 32k dictionary (``dict.src.txt`` = ``dict.tgt.txt``, shared
    embeddings). Returns the checkpoint path (reused when already there).
    """
    ckpt = out_dir / "checkpoint.pt"
    if ckpt.is_file():
        return ckpt
    import torch
    from fairseq import options, tasks
    from fairseq.models.transformer import TransformerModel

    out_dir.mkdir(parents=True, exist_ok=True)
    specials = 4  # <s> <pad> </s> <unk>
    symbols = "".join(f"w{i} 1\n" for i in range(BASE_SHAPE["vocab"] - specials))
    for lang in ("src", "tgt"):
        (out_dir / f"dict.{lang}.txt").write_text(symbols)
    d, ffn, layers, heads = (BASE_SHAPE[k] for k in ("dim", "ffn", "layers", "heads"))
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser,
        [str(out_dir), "--task", "translation", "--arch", "transformer"]
        + ["--source-lang", "src", "--target-lang", "tgt", "--share-all-embeddings"]
        + ["--encoder-layers", str(layers), "--decoder-layers", str(layers)]
        + ["--encoder-embed-dim", str(d), "--decoder-embed-dim", str(d)]
        + ["--encoder-ffn-embed-dim", str(ffn), "--decoder-ffn-embed-dim", str(ffn)]
        + ["--encoder-attention-heads", str(heads), "--decoder-attention-heads", str(heads)]
        + ["--seed", str(seed), "--cpu"],
    )
    torch.manual_seed(seed)
    task = tasks.setup_task(args)
    model = TransformerModel.build_model(args, task)
    n = len(task.target_dictionary)
    if n != BASE_SHAPE["vocab"]:
        raise RuntimeError(f"base dictionary has {n} entries, expected {BASE_SHAPE['vocab']}")
    history = [
        {
            "criterion_name": "CrossEntropyCriterion",
            "optimizer_name": "Adam",
            "lr_scheduler_state": {"best": None},
            "num_updates": 0,
        }
    ]
    state = {"args": args, "model": model.state_dict(), "optimizer_history": history}
    torch.save(state | {"extra_state": {}}, ckpt)
    return ckpt


def model_files(name: str) -> dict:
    """Checkpoint, dictionary dir, languages and shape of a benchmark model."""
    import torch

    if name == "multi30k":
        if not (MULTI30K / "checkpoint_best.pt").is_file():
            raise FileNotFoundError(f"{MULTI30K}/checkpoint_best.pt not found")
        info = dict(
            checkpoint=str(MULTI30K / "checkpoint_best.pt"),
            data=str(MULTI30K),
            source_lang="en",
            target_lang="de",
        )
    elif name == "base":
        ckpt = make_base_model()
        info = dict(
            checkpoint=str(ckpt), data=str(ckpt.parent), source_lang="src", target_lang="tgt"
        )
    else:
        raise ValueError(name)
    state = torch.load(info["checkpoint"], map_location="cpu", weights_only=False)
    a = state["args"] if state.get("args") is not None else state["cfg"]["model"]
    vocab = sum(1 for _ in open(Path(info["data"]) / f"dict.{info['target_lang']}.txt")) + 4
    info["shape"] = dict(
        encoder_layers=a.encoder_layers,
        decoder_layers=a.decoder_layers,
        dim=a.encoder_embed_dim,
        heads=a.encoder_attention_heads,
        ffn=a.encoder_ffn_embed_dim,
        vocab=vocab,
    )
    return info


def make_inputs(name: str, info: dict, sentences: int, seed: int = 1) -> dict:
    """Source token ids (each ending with EOS) and references, saved for workers."""
    import torch

    if name == "multi30k":
        from fairseq.data import Dictionary, data_utils

        src_dict = Dictionary.load(str(Path(info["data"]) / "dict.en.txt"))
        ds = data_utils.load_indexed_dataset(
            str(MULTI30K / "data-bin" / "test.en-de.en"), src_dict, dataset_impl=None
        )
        n = min(sentences, len(ds))
        sources = [ds[i].tolist() for i in range(n)]
        refs = None
        if MULTI30K_TEST_DE.is_file():
            from seqfuse.bleu import read_lines

            refs = read_lines(MULTI30K_TEST_DE)[:n]
        ref_lens = [len(x) for x in _load_tgt_lengths(n)]
        forced_len = math.ceil(statistics.mean(ref_lens)) if ref_lens else 16
    else:
        g = torch.Generator().manual_seed(seed)
        vocab, eos = info["shape"]["vocab"], 2
        sources = []
        for _ in range(sentences):
            length = int(torch.randint(8, 33, (1,), generator=g))
            sources.append(torch.randint(4, vocab, (length,), generator=g).tolist() + [eos])
        refs, forced_len = None, None
    return dict(sources=sources, refs=refs, forced_len=forced_len)


def _load_tgt_lengths(n: int) -> list:
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(str(MULTI30K / "dict.de.txt"))
    ds = data_utils.load_indexed_dataset(
        str(MULTI30K / "data-bin" / "test.en-de.de"), d, dataset_impl=None
    )
    return [ds[i][:-1] for i in range(min(n, len(ds)))]


# --------------------------------------------------------------------------- workers


def _batches(sources: list, batch: int) -> list:
    """Indices sorted by source length (as fairseq orders), cut into batches."""
    order = sorted(range(len(sources)), key=lambda i: (len(sources[i]), i))
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Profiler memory events of these devices are host memory (as torch's own tables count them).
_HOST_DEVICE_TYPES = ("CPU", "MKLDNN", "IDEEP")


def generation_peak_bytes(fn, device: str = "cpu") -> tuple:
    """Run ``fn()`` once; return ``(its result, peak bytes)``.

    The peak is the largest amount of tensor memory allocated during the call
    and live at one time, above what was live before it (model weights and
    earlier tensors are not counted; what the call frees of them is not
    subtracted). On the CPU it is rebuilt from the allocation and free events
    torch's CPU allocator reports to the profiler (``profile_memory=True``):
    a running sum of their sizes in time order, whose maximum is the peak
    (allocations made outside torch's allocator, e.g. by oneDNN or MKL
    internally, are not seen; Python's cyclic collector is paused during the
    call, after a collection, so that no earlier garbage is freed inside). On
    a GPU it is
    ``torch.cuda.max_memory_allocated()`` minus the bytes allocated before.
    Either way the free buffers seqfuse's K/V cache pool holds when the call
    starts count as the call's own (it takes them instead of allocating).
    """
    import torch

    held = _cache_pool_bytes()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return out, max(0, torch.cuda.max_memory_allocated() - base) + held
    import gc

    from torch.profiler import ProfilerActivity, profile

    # Earlier garbage collected inside the window would count as freed by the
    # call (its blocks' sizes are known when they were allocated while an
    # earlier profile ran): collect it first and pause the collector.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    finally:
        if was_enabled:
            gc.enable()
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and str(e.device_type()).rsplit(".", 1)[-1] in _HOST_DEVICE_TYPES
    ]
    live = peak = 0
    for _t, _i, nbytes in sorted(events):  # time order; ties keep the recorded order
        live += nbytes
        peak = max(peak, live)
    return out, peak + held


def _cache_pool_bytes() -> int:
    """Bytes of free K/V buffers seqfuse's cache pool holds (0 when seqfuse's
    layers are not loaded)."""
    kv_cache = sys.modules.get("seqfuse.layers.kv_cache")
    return kv_cache.BUFFERS.free_bytes() if kv_cache is not None else 0


class Worker:
    """Runs one provider in this process; ``run`` translates all sentences once."""

    def __init__(self, spec: dict):
        import torch

        self.spec = spec
        self.device = spec["device"]
        self.dtype = spec["dtype"]
        self.sources = spec["inputs"]["sources"]
        self.forced_len = spec["forced_len"]
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        torch.manual_seed(0)
        self.torch = torch
        self.tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            self.dtype
        ]
        getattr(self, "_setup_" + spec["provider"].replace("-", "_"))()

    # fairseq and seqfuse share everything but the generator class (and the plugin)
    def _setup_fairseq(self, seqfuse: bool = False):
        os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        from fairseq import checkpoint_utils

        if seqfuse:
            from fairseq.utils import import_user_module

            import seqfuse

            import_user_module(Namespace(user_dir=seqfuse.fairseq_user_dir()))
        else:
            from fairseq.sequence_generator import SequenceGenerator
        info = self.spec["model_info"]
        overrides = {
            "data": info["data"],
            "source_lang": info["source_lang"],
            "target_lang": info["target_lang"],
        }
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [info["checkpoint"]], arg_overrides=overrides
        )
        model = models[0].eval().to(device=self.device, dtype=self.tdtype)
        if seqfuse:
            # The plugin's own choice (SEQFUSE_FUSED_LAYERS is set per provider
            # by WorkerProcess): seqfuse's generator, layers fused or not.
            from seqfuse.fairseq_plugin import select_generator

            SequenceGenerator = select_generator([model], Namespace())
            if SequenceGenerator is None:
                raise RuntimeError("the seqfuse plugin falls back to stock for this model")
            fused = bool(getattr(model, "_seqfuse_fused", False))
            if fused != (self.spec["provider"] == "seqfuse-fused"):
                raise RuntimeError(f"fused layers {'on' if fused else 'off'} for {self.spec}")
        self.model, self.tgt_dict, self.generator_cls = (
            model,
            task.target_dictionary,
            SequenceGenerator,
        )
        self.pad = task.source_dictionary.pad()
        self.run_batch = self._run_fairseq

    def _setup_seqfuse(self):
        self._setup_fairseq(seqfuse=True)

    def _setup_seqfuse_fused(self):
        self._setup_fairseq(seqfuse=True)

    def _fairseq_generator(self, beam: int):
        kw = dict(beam_size=beam, max_len_a=0, max_len_b=200, min_len=1)
        if self.forced_len:
            kw.update(max_len_b=self.forced_len, min_len=self.forced_len)
        return self.generator_cls([self.model], self.tgt_dict, **kw)

    def _fairseq_sample(self, idx: list) -> dict:
        torch = self.torch
        srcs = [self.sources[i] for i in idx]
        width = max(len(s) for s in srcs)
        tokens = torch.full((len(srcs), width), self.pad, dtype=torch.long)
        for r, s in enumerate(srcs):  # fairseq left-pads the source
            tokens[r, width - len(s) :] = torch.tensor(s)
        return {
            "id": torch.tensor(idx),
            "net_input": {
                "src_tokens": tokens.to(self.device),
                "src_lengths": torch.tensor([len(s) for s in srcs], device=self.device),
            },
        }

    def _run_fairseq(self, gen, idx: list, measure: list | None = None) -> list:
        sample = self._fairseq_sample(idx)
        if measure is None:
            hypos = gen.generate([self.model], sample)
        else:  # the generate call alone
            hypos, peak = generation_peak_bytes(
                lambda: gen.generate([self.model], sample), self.device
            )
            measure.append(peak)
        eos = self.tgt_dict.eos()
        out = []
        for h in hypos:
            t = h[0]["tokens"].tolist()
            out.append(t[:-1] if t and t[-1] == eos else t)
        return out

    def _marian(self):
        from transformers import MarianConfig, MarianMTModel

        s = self.spec["model_info"]["shape"]
        cfg = MarianConfig(
            vocab_size=s["vocab"],
            decoder_vocab_size=s["vocab"],
            d_model=s["dim"],
            encoder_layers=s["encoder_layers"],
            decoder_layers=s["decoder_layers"],
            encoder_attention_heads=s["heads"],
            decoder_attention_heads=s["heads"],
            encoder_ffn_dim=s["ffn"],
            decoder_ffn_dim=s["ffn"],
            activation_function="relu",
            max_position_embeddings=1024,
            pad_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
            scale_embedding=True,
            share_encoder_decoder_embeddings=True,
        )
        self.torch.manual_seed(0)
        return MarianMTModel(cfg).eval().to(device=self.device, dtype=self.tdtype)

    def _setup_hf(self):
        if not self.forced_len:
            raise RuntimeError("hf needs a forced output length")
        self.model = self._marian()
        self.run_batch = self._run_hf

    def _setup_seqfuse_hf(self):
        import seqfuse

        self.model = seqfuse.optimize(self._marian())
        self.run_batch = self._run_hf

    def _run_hf(self, beam: int, idx: list, measure: list | None = None) -> list:
        if measure is not None:
            out, peak = generation_peak_bytes(lambda: self._run_hf(beam, idx), self.device)
            measure.append(peak)
            return out
        torch = self.torch
        srcs = [self.sources[i] for i in idx]
        width = max(len(s) for s in srcs)
        ids = torch.full((len(srcs), width), 1, dtype=torch.long)
        mask = torch.zeros((len(srcs), width), dtype=torch.long)
        for r, s in enumerate(srcs):  # right padding with an attention mask
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
        out = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            num_beams=beam,
            do_sample=False,
            max_new_tokens=self.forced_len,
            min_new_tokens=self.forced_len,
            length_penalty=1.0,
            num_return_sequences=1,
        )
        res = []
        for row in out.tolist():
            row = row[1:]  # decoder start token
            res.append([t for t in row if t not in (1, 2)])
        return res

    def _setup_ctranslate2(self):
        try:
            import ctranslate2
        except ImportError as e:
            raise RuntimeError(
                "ctranslate2 is not installed (pip install -r requirements-bench.txt)"
            ) from e
        info = self.spec["model_info"]
        out = Path(self.spec["ct2_dir"])
        if not (out / "model.bin").is_file():
            os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
            from ctranslate2.converters import FairseqConverter

            FairseqConverter(
                info["checkpoint"],
                info["data"],
                info["source_lang"],
                info["target_lang"],
                unsafe_deserialization=True,  # our own / the shared trusted checkpoint
            ).convert(str(out), force=True)
        compute = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.dtype]
        self.translator = ctranslate2.Translator(
            str(out),
            device=self.device,
            compute_type=compute,
            inter_threads=1,
            intra_threads=self.spec["threads"] or 0,
        )
        from fairseq.data import Dictionary

        self.src_dict = Dictionary.load(str(Path(info["data"]) / f"dict.{info['source_lang']}.txt"))
        self.tgt_dict = Dictionary.load(str(Path(info["data"]) / f"dict.{info['target_lang']}.txt"))
        self.run_batch = self._run_ct2

    def _run_ct2(self, beam: int, idx: list) -> list:
        srcs = [[self.src_dict[t] for t in self.sources[i][:-1]] for i in idx]  # CT2 adds EOS
        kw = dict(beam_size=beam, max_batch_size=0, length_penalty=1.0)
        if self.forced_len:
            kw.update(min_decoding_length=self.forced_len, max_decoding_length=self.forced_len)
        else:
            kw.update(max_decoding_length=200)
        results = self.translator.translate_batch(srcs, **kw)
        return [[self.tgt_dict.index(p) for p in r.hypotheses[0]] for r in results]

    def measure_memory(self, batch: int, beam: int) -> dict:
        """Generation's own peak memory (``generation_peak_bytes``) on every
        batch of one untimed pass; the largest is reported."""
        torch = self.torch
        if self.spec["provider"] == "ctranslate2":  # its own allocator: not seen
            return {"gen_peak_mb": None, "gen_mem_kind": None}
        fairseq = self.spec["provider"] in FAIRSEQ_PROVIDERS
        gen = self._fairseq_generator(beam) if fairseq else beam
        peaks: list = []
        with torch.inference_mode():
            for idx in _batches(self.sources, batch):
                self.run_batch(gen, idx, measure=peaks)
        kind = "cuda_allocated" if self.device.startswith("cuda") else "cpu_profiler"
        return {"gen_peak_mb": max(peaks) / 2**20, "gen_mem_kind": kind}

    def run(self, batch: int, beam: int, collect: bool, profile: bool) -> dict:
        torch = self.torch
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fairseq = self.spec["provider"] in FAIRSEQ_PROVIDERS
        gen = self._fairseq_generator(beam) if fairseq else beam
        timers, hooks = None, []
        if profile and fairseq:
            timers, hooks = _instrument(self.model, cuda, torch)
        outputs: dict = {}
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for idx in _batches(self.sources, batch):
                for i, toks in zip(idx, self.run_batch(gen, idx)):
                    outputs[i] = toks
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        for restore in hooks:
            restore()
        res = {
            "seconds": seconds,
            "tokens": sum(len(t) for t in outputs.values()),
            "peak_rss_mb": _peak_rss_mb(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20
            if cuda and self.spec["provider"] != "ctranslate2"
            else None,
        }
        if timers is not None and timers["calls"] > 0:
            model_s = timers["encoder"] + timers["decoder"]
            res["model_share"] = model_s / seconds if seconds > 0 else None
            res["profile"] = timers
        if collect:
            res["outputs"] = [outputs[i] for i in range(len(self.sources))]
        return res


def _instrument(model, cuda: bool, torch) -> tuple[dict, list]:
    """Time the encoder and decoder calls; the rest of a generation is search.

    Generators call ``encoder.forward_torchscript`` / ``decoder.forward`` directly
    (module hooks never fire), so those methods are wrapped on the instances;
    whichever generator runs, the network is ``model.encoder`` and
    ``model.decoder`` (output projection included; log-softmax, top-k and cache
    reorders count as search). Returns the timers and an undo list of callables.
    """
    timers = {"encoder": 0.0, "decoder": 0.0, "calls": 0}
    undo = []
    depth = [0]  # time the outermost call only
    for name, methods in (
        ("encoder", ("forward_torchscript", "forward")),
        ("decoder", ("forward",)),
    ):
        module = getattr(model, name)
        for meth in methods:
            fn = getattr(module, meth)

            def timed(*a, _fn=fn, _name=name, **kw):
                depth[0] += 1
                if depth[0] == 1 and cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    if depth[0] == 1:
                        if cuda:
                            torch.cuda.synchronize()
                        timers[_name] += time.perf_counter() - t
                        timers["calls"] += 1
                    depth[0] -= 1

            setattr(module, meth, timed)
            undo.append(lambda m=module, n=meth: delattr(m, n))
    return timers, undo


def worker_main(spec_path: str) -> int:
    """Serve run requests on stdin, one JSON object a line, answers on stdout."""
    spec = json.loads(Path(spec_path).read_text())
    spec["inputs"] = json.loads(Path(spec["inputs_path"]).read_text())
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not mix with answers
    try:
        t = time.perf_counter()
        w = Worker(spec)
        ready = {"ok": True, "load_seconds": time.perf_counter() - t, "load_rss_mb": _peak_rss_mb()}
    except Exception as e:
        ready = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write(MARKER + json.dumps(ready) + "\n")
    out.flush()
    if not ready["ok"]:
        return 0
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            if req.get("memory"):
                res = w.measure_memory(req["batch"], req["beam"])
            else:
                res = w.run(
                    req["batch"], req["beam"], req.get("collect", False), req.get("profile", False)
                )
            res["ok"] = True
        except Exception as e:
            res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(MARKER + json.dumps(res) + "\n")
        out.flush()
    return 0


class WorkerProcess:
    def __init__(self, spec: dict, spec_path: Path, log_path: Path):
        spec_path.write_text(json.dumps(spec))
        self.provider = spec["provider"]
        self.forced_len = spec["forced_len"]
        self.log = open(log_path, "w")
        env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONUNBUFFERED="1")
        # Fused layers exactly for seqfuse-fused, whatever the caller's environment says.
        env["SEQFUSE_FUSED_LAYERS"] = "1" if self.provider == "seqfuse-fused" else "0"
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.error: str | None = None
        self.ready: dict | None = None

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER) :])
        return {
            "ok": False,
            "error": f"worker exited (status {self.proc.wait()}); see {self.log.name}",
        }

    def wait_ready(self) -> dict:
        self.ready = self._answer()
        if not self.ready["ok"]:
            self.error = self.ready["error"]
        return self.ready

    def request(self, **req) -> dict:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"ok": False, "error": f"worker died; see {self.log.name}"}
        return self._answer()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# --------------------------------------------------------------------------- driver


def context(devices: list, threads: int | None) -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("fairseq", "transformers", "ctranslate2", "sacrebleu"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        from seqfuse.version import __version__ as sv

        versions["seqfuse"] = sv
    except Exception:
        versions["seqfuse"] = None
    from seqfuse.info import cpu_description, source_revision

    ctx = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_revision": source_revision(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if "cuda" in devices else None,
        "devices": devices,
        "platform": platform.platform(),
        "versions": versions,
    }
    return ctx


def _bleu(hyps: list, refs: list) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU().corpus_score(hyps, [refs]).score


def run_benchmark(args) -> dict:
    import torch

    devices = ["cpu"] if args.device == "cpu" else []
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices.append("cuda")
    if args.device == "cuda" and "cuda" not in devices:
        raise SystemExit("benchmark: --device cuda but no CUDA device is available")
    if args.device == "auto" and not devices:
        devices = ["cpu"]
    if args.device == "auto" and "cuda" in devices and args.cpu_too:
        devices.insert(0, "cpu")
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"benchmark: unknown providers {bad}; choose from {PROVIDERS}")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = WORK / "run"
    work.mkdir(parents=True, exist_ok=True)

    rows, skipped = [], []
    configs = sorted(
        ((b, k) for b in args.batch_sizes for k in args.beams), key=lambda c: (c[0] * c[1], c)
    )
    for model_name in args.models:
        try:
            info = model_files(model_name)
        except FileNotFoundError as e:
            skipped.append({"model": model_name, "reason": str(e)})
            print(f"[skip] model {model_name}: {e}")
            continue
        sentences = args.sentences if model_name == "multi30k" else args.base_sentences
        inputs = make_inputs(model_name, info, sentences)
        forced_model = args.forced_len if model_name == "base" else None
        inputs_path = work / f"inputs-{model_name}.json"
        inputs_path.write_text(json.dumps(inputs))
        tgt_dict = None
        if model_name == "multi30k":
            from fairseq.data import Dictionary

            tgt_dict = Dictionary.load(str(Path(info["data"]) / "dict.de.txt"))
        for device in devices:
            dtypes = ["fp32"] if device == "cpu" else args.gpu_dtypes
            for dtype in dtypes:
                workers = []
                for p in providers:
                    # The peers on random weights need a forced length; on the real
                    # model HF gets the mean reference length of these sentences.
                    forced = forced_model
                    if p in ("hf", "seqfuse-hf") and forced is None:
                        forced = inputs["forced_len"]
                    spec = dict(
                        provider=p,
                        device=device,
                        dtype=dtype,
                        threads=args.threads,
                        model_info=info,
                        inputs_path=str(inputs_path),
                        forced_len=forced,
                        ct2_dir=str(WORK / "ct2" / model_name),
                    )
                    tag = f"{model_name}-{device}-{dtype}-{p}"
                    workers.append(WorkerProcess(spec, work / f"{tag}.json", work / f"{tag}.log"))
                live = []
                for w in workers:
                    r = w.wait_ready()
                    if r["ok"]:
                        live.append(w)
                        print(
                            f"[ready] {model_name}/{device}/{dtype}/{w.provider}: loaded in "
                            f"{r['load_seconds']:.1f}s, RSS {r['load_rss_mb']:.0f} MB"
                        )
                    else:
                        msg = r["error"]
                        skipped.append(
                            dict(
                                model=model_name,
                                device=device,
                                dtype=dtype,
                                provider=w.provider,
                                reason=msg,
                            )
                        )
                        print(f"[skip] {model_name}/{device}/{dtype}/{w.provider}: {msg}")
                        w.close()
                for batch, beam in configs:
                    times = {w.provider: [] for w in live}
                    first: dict = {w.provider: {} for w in live}
                    where = dict(model=model_name, device=device, dtype=dtype)
                    where |= dict(batch=batch, beam=beam)
                    for w in list(live):  # warm-up
                        _request(w, live, skipped, where)
                    for rep in range(args.repeats):
                        for w in list(live):
                            r = _request(w, live, skipped, where, collect=rep == 0)
                            if not r["ok"]:
                                continue
                            times[w.provider].append(r["seconds"])
                            keep = ("peak_rss_mb", "cuda_peak_mb")
                            first[w.provider].update(
                                {k: v for k, v in r.items() if rep == 0 or k in keep}
                            )
                    # Network vs search time: one more, instrumented run (not timed above).
                    for w in list(live):
                        if w.provider in FAIRSEQ_PROVIDERS and not args.no_profile:
                            r = _request(w, live, skipped, where, profile=True)
                            if r["ok"]:
                                first[w.provider]["model_share"] = r.get("model_share")
                    # Generation's own peak memory: one more run, measured call by call.
                    for w in list(live):
                        if not args.no_memory:
                            r = _request(w, live, skipped, where, memory=True)
                            if r["ok"]:
                                first[w.provider]["gen_peak_mb"] = r["gen_peak_mb"]
                                first[w.provider]["gen_mem_kind"] = r["gen_mem_kind"]
                    stock_out = first.get("fairseq", {}).get("outputs")
                    for w in live:
                        f = first[w.provider]
                        med = statistics.median(times[w.provider])
                        outs = f.get("outputs")
                        bleu = None
                        if (
                            tgt_dict is not None
                            and inputs["refs"]
                            and w.provider in FAIRSEQ_PROVIDERS + ("ctranslate2",)
                        ):
                            hyps = [tgt_dict.string(o, "sentencepiece") for o in outs]
                            bleu = _bleu(hyps, inputs["refs"])
                        same = None
                        if stock_out is not None and w.provider in (
                            "seqfuse",
                            "seqfuse-fused",
                            "ctranslate2",
                        ):
                            same = sum(a == b for a, b in zip(outs, stock_out)) / len(outs)
                        mem_kind = "cuda_allocated" if f.get("cuda_peak_mb") is not None else "rss"
                        row = dict(
                            model=model_name,
                            device=device,
                            dtype=dtype,
                            provider=w.provider,
                            batch=batch,
                            beam=beam,
                            sentences=len(inputs["sources"]),
                            target_tokens=f["tokens"],
                            forced_len=w.forced_len,
                            median_seconds=med,
                            tokens_per_s=f["tokens"] / med,
                            sentences_per_s=len(inputs["sources"]) / med,
                            peak_mem_mb=f["cuda_peak_mb"]
                            if mem_kind == "cuda_allocated"
                            else f["peak_rss_mb"],
                            mem_kind=mem_kind,
                            gen_peak_mb=f.get("gen_peak_mb"),
                            gen_mem_kind=f.get("gen_mem_kind"),
                            bleu=bleu,
                            identical_to_stock=same,
                            outputs_sha1=hashlib.sha1(json.dumps(outs).encode()).hexdigest(),
                            model_share=f.get("model_share"),
                            times=times[w.provider],
                        )
                        rows.append(row)
                        print(_fmt_row(row))
                for w in live:
                    w.close()
    return dict(rows=rows, skipped=skipped, devices=devices)


def _request(w: WorkerProcess, live: list, skipped: list, where: dict, **req) -> dict:
    """One run on a worker; a failing provider is reported and leaves ``live``."""
    r = w.request(batch=where["batch"], beam=where["beam"], **req)
    if not r["ok"]:
        print(f"[error] {w.provider} {where}: {r['error']}")
        skipped.append(where | {"provider": w.provider, "reason": r["error"]})
        live.remove(w)
        w.close()
    return r


def _fmt_row(r: dict) -> str:
    extra = []
    if r["bleu"] is not None:
        extra.append(f"BLEU {r['bleu']:.2f}")
    if r["identical_to_stock"] is not None:
        extra.append(f"identical {100 * r['identical_to_stock']:.0f}%")
    if r["model_share"] is not None:
        extra.append(f"model share {100 * r['model_share']:.0f}%")
    if r.get("gen_peak_mb") is not None:
        extra.append(f"generation peak {r['gen_peak_mb']:.1f} MB")
    return (
        f"{r['model']:>8} {r['device']:>4} {r['dtype']:>4} {r['provider']:>13} "
        f"b{r['batch']:<4}k{r['beam']:<2} {r['tokens_per_s']:>9.1f} tok/s "
        f"{r['sentences_per_s']:>7.2f} sent/s {r['peak_mem_mb']:>7.0f} MB " + " ".join(extra)
    )


# ratios(): (provider, key prefix) of the seqfuse variants compared with their peers.
SEQFUSE_VARIANTS = (("seqfuse", "seqfuse"), ("seqfuse-fused", "seqfuse_fused"))


def ratios(rows: list) -> list:
    """Per setting: tokens/s of seqfuse (and seqfuse-fused) over stock fairseq
    and CTranslate2 (``seqfuse_vs_stock``, ``seqfuse_fused_vs_ctranslate2``, ...),
    and generation peak memory over stock's (``seqfuse_gen_mem_vs_stock``,
    ``seqfuse_fused_gen_mem_vs_stock``: below 1 is less memory).

    ``..._vs_stock_paired``: the median over the repeats of each repeat's own
    ratio. The providers run in turn within a repeat, so on a machine whose
    speed drifts (other work on its CPUs) each repeat's pair saw about the same
    machine; the ratio of the medians can pair a fast repeat with a slow one."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["device"], r["dtype"], r["batch"], r["beam"]), {})[
            r["provider"]
        ] = r
    out = []
    for key, group in sorted(by.items()):
        if not any(p in group for p, _ in SEQFUSE_VARIANTS):
            continue
        entry = dict(zip(("model", "device", "dtype", "batch", "beam"), key))
        for provider, prefix in SEQFUSE_VARIANTS:
            s = group.get(provider)
            if s is None:
                continue
            for peer, name in (("fairseq", "stock"), ("ctranslate2", "ctranslate2")):
                if peer in group:
                    p = group[peer]
                    entry[f"{prefix}_vs_{name}"] = s["tokens_per_s"] / p["tokens_per_s"]
                    pairs = list(zip(s.get("times") or [], p.get("times") or []))
                    if pairs and len(s["times"]) == len(p["times"]):
                        entry[f"{prefix}_vs_{name}_paired"] = statistics.median(
                            (s["target_tokens"] / ts) / (p["target_tokens"] / tp)
                            for ts, tp in pairs
                        )
            stock = group.get("fairseq")
            if stock and s.get("gen_peak_mb") is not None and stock.get("gen_peak_mb"):
                entry[f"{prefix}_gen_mem_vs_stock"] = s["gen_peak_mb"] / stock["gen_peak_mb"]
        out.append(entry)
    return out


RATIO_LABELS = (
    ("seqfuse_vs_stock", "seqfuse/stock {:.2f}x"),
    ("seqfuse_vs_stock_paired", "(paired {:.2f}x)"),
    ("seqfuse_vs_ctranslate2", "seqfuse/CTranslate2 {:.2f}x"),
    ("seqfuse_fused_vs_stock", "fused/stock {:.2f}x"),
    ("seqfuse_fused_vs_stock_paired", "(paired {:.2f}x)"),
    ("seqfuse_fused_vs_ctranslate2", "fused/CTranslate2 {:.2f}x"),
    ("seqfuse_gen_mem_vs_stock", "generation memory seqfuse/stock {:.2f}"),
    ("seqfuse_fused_gen_mem_vs_stock", "fused/stock {:.2f}"),
)


CSV_FIELDS = [
    "model", "device", "dtype", "provider", "batch", "beam", "sentences", "target_tokens",
    "forced_len", "median_seconds", "tokens_per_s", "sentences_per_s", "peak_mem_mb",
    "mem_kind", "gen_peak_mb", "gen_mem_kind", "bleu", "identical_to_stock", "model_share",
    "outputs_sha1",
]  # fmt: skip


def write_results(report: dict, results_dir: Path, name: str) -> dict:
    results_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": results_dir / f"{name}.json", "csv": results_dir / f"{name}.csv"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    ctx = report["context"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS + ["date", "git_revision", "cpu", "gpu", "torch", "fairseq"])
        for r in report["results"]:
            w.writerow(
                [r[k] for k in CSV_FIELDS]
                + [ctx["date"], ctx["git_revision"], ctx["cpu"], ctx["gpu"]]
                + [ctx["versions"]["torch"], ctx["versions"]["fairseq"]]
            )
    png = plot(report, results_dir / f"{name}.png")
    if png is not None:
        paths["png"] = png
    return paths


def plot(report: dict, path: Path) -> Path | None:
    """tokens/s vs batch size, one panel per model/device/dtype, a line per provider x beam."""
    try:
        import logging

        # before the import: it logs its set-up at DEBUG, and fairseq's
        # logging configuration lets DEBUG through
        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[skip] plot: matplotlib is not installed (pip install -r requirements-bench.txt)")
        return None
    rows = report["results"]
    panels = sorted({(r["model"], r["device"], r["dtype"]) for r in rows})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (m, d, t) in zip(axes[0], panels):
        sub = [r for r in rows if (r["model"], r["device"], r["dtype"]) == (m, d, t)]
        beams = sorted({r["beam"] for r in sub})
        for pi, p in enumerate(PROVIDERS):
            for bi, k in enumerate(beams):
                pts = sorted(
                    (r["batch"], r["tokens_per_s"])
                    for r in sub
                    if r["provider"] == p and r["beam"] == k
                )
                if pts:
                    ax.plot(
                        [x for x, _ in pts],
                        [y for _, y in pts],
                        styles[bi % len(styles)],
                        marker="o",
                        color=f"C{pi}",
                        label=f"{p} beam {k}",
                    )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sentences)")
        ax.set_ylabel("target tokens / s")
        ax.set_title(f"{m} / {d} / {t}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{report['context']['cpu'] if 'cpu' in report['context']['devices'] else ''} "
        f"{report['context']['gpu'] or ''} ({report['context']['date'][:10]})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ints(text: str) -> list:
    return [int(x) for x in text.split(",") if x]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--full", action="store_true", help="batch 1/16/64/128 x beam 1/4/5, more sentences"
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="generation memory preset: multi30k, fairseq,seqfuse,seqfuse-fused, "
        "batch 128, beam 5, the 1000 test sentences (other options override)",
    )
    p.add_argument("--models", help=f"comma-separated: {','.join(MODELS)} (default: all)")
    p.add_argument(
        "--providers",
        help=f"comma-separated: {','.join(PROVIDERS)} (default: {','.join(DEFAULT_PROVIDERS)})",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when present, else the CPU")  # fmt: skip
    p.add_argument("--cpu-too", action="store_true", help="with a GPU, also run the CPU")
    p.add_argument("--gpu-dtypes", default="fp32,fp16,bf16")
    p.add_argument("--batch-sizes", type=_ints)
    p.add_argument("--beams", type=_ints)
    p.add_argument("--sentences", type=int, help="Multi30k test sentences")
    p.add_argument("--base-sentences", type=int, help="synthetic sentences for the base model")
    p.add_argument("--forced-len", type=int, default=16, help="output length on the base model")
    p.add_argument("--repeats", type=int)
    p.add_argument(
        "--no-profile", action="store_true", help="skip the network vs search time split"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the generation peak memory run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per provider")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--name", help="results file stem (default: bench-<device>-<date>)")
    p.add_argument("--make-base-model", action="store_true", help="only write the base checkpoint")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def apply_sweep(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the sweep chosen (--memory, --full or
    the small default) and split the comma-separated lists, in place."""
    sweep = MEMORY_SWEEP if args.memory else FULL_SWEEP if args.full else SMALL_SWEEP
    args.models = args.models or sweep.get("models", ",".join(MODELS))
    args.providers = args.providers or sweep.get("providers", ",".join(DEFAULT_PROVIDERS))
    args.batch_sizes = args.batch_sizes or sweep["batch_sizes"]
    args.beams = args.beams or sweep["beams"]
    args.sentences = args.sentences or sweep["sentences"]
    args.base_sentences = args.base_sentences or (256 if args.full else 16)
    args.repeats = args.repeats or sweep["repeats"]
    args.models = [m for m in args.models.split(",") if m]
    args.gpu_dtypes = [d for d in args.gpu_dtypes.split(",") if d]
    for m in args.models:
        if m not in MODELS:
            raise SystemExit(f"benchmark: unknown model {m}; choose from {MODELS}")
    return args


def main(argv: list | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.make_base_model:
        print(make_base_model())
        return 0
    apply_sweep(args)
    from seqfuse.info import cpu_probe, probe_warning

    probe_before = cpu_probe(args.threads)
    start = time.perf_counter()
    out = run_benchmark(args)
    seconds = time.perf_counter() - start
    probe = {"before": probe_before, "after": cpu_probe(args.threads)}
    report = {
        "context": context(out["devices"], args.threads) | {"cpu_probe": probe},
        "settings": {
            "batch_sizes": args.batch_sizes,
            "beams": args.beams,
            "sentences": args.sentences,
            "base_sentences": args.base_sentences,
            "forced_len": args.forced_len,
            "repeats": args.repeats,
            "models": args.models,
            "providers": args.providers.split(","),
            "gpu_dtypes": args.gpu_dtypes,
            "full": args.full,
            "memory": args.memory,
            "no_memory": args.no_memory,
        },
        "results": out["rows"],
        "ratios": ratios(out["rows"]),
        "skipped": out["skipped"],
        "seconds": seconds,
    }
    name = args.name or f"bench-{'-'.join(out['devices'])}-{report['context']['date'][:10]}"
    paths = write_results(report, Path(args.results_dir), name)
    print()
    for r in report["ratios"]:
        parts = [label.format(r[k]) for k, label in RATIO_LABELS if k in r]
        print(
            f"{r['model']:>8} {r['device']:>4} {r['dtype']:>4} batch {r['batch']:<4} beam {r['beam']:<2} "
            + "  ".join(parts)
        )
    warning = probe_warning(probe["before"], probe["after"])
    print(
        f"CPU GEMM rate (GFLOP/s, 1 / {probe_before['threads']} threads): before "
        f"{probe['before']['gflops_one_thread']} / {probe['before']['gflops_threads']}, after "
        f"{probe['after']['gflops_one_thread']} / {probe['after']['gflops_threads']}"
    )
    if warning:
        print(warning)
    print("written:", ", ".join(str(p) for p in paths.values()))
    print(f"benchmark took {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
