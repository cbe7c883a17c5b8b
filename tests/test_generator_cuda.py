"""seqfuse.generation.SequenceGenerator on a GPU, against stock fairseq on the same GPU.

Two things only a device can show: the search gives stock's hypotheses with
the CUDA candidate kernel (tokens equal, scores within the fp32 tolerance), and
the step loop does not read back from the device on every step (the end-of-search
check reads back every ``compact_every`` steps). Host reads are counted with
torch's sync debug mode, attributed to the Python file that made them.
"""

from __future__ import annotations

import collections
import os
import warnings

import pytest
import torch
from fairseq.sequence_generator import SequenceGenerator as StockGenerator
from generation_utils import (
    compare_hypotheses,
    load_multi30k,
    random_sample,
    random_transformer,
    run_both,
)

from seqfuse.generation import SequenceGenerator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SEQFUSE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def on_cuda(sample):
    out = dict(sample)
    out["net_input"] = {k: v.cuda() for k, v in sample["net_input"].items()}
    return out


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beam", [1, 4, 5])
def test_random_transformer_matches_stock_on_cuda(seed, beam):
    model, d = random_transformer(vocab=60 + 97 * seed, seed=seed, perturb=True)
    model = model.cuda()
    sample = on_cuda(random_sample(d, bsz=7, seed=seed))
    stock, ours = run_both([model], d, sample, {"beam_size": beam, "max_len_b": 14})
    compare_hypotheses(stock, ours, f"cuda seed {seed} beam {beam}")


def test_multi30k_matches_stock_on_cuda():
    model, task = load_multi30k()
    model = model.cuda()
    d = task.target_dictionary
    itr = task.get_batch_iterator(
        task.dataset("test"), max_sentences=64, required_batch_size_multiple=1
    ).next_epoch_itr(shuffle=False)
    for _, batch in zip(range(3), itr):
        sample = on_cuda(batch)
        stock, ours = run_both([model], d, sample, {"beam_size": 5})
        compare_hypotheses(stock, ours, "multi30k cuda beam 5")


def _host_reads(gen, model, sample) -> collections.Counter:
    """Synchronising device calls during one generate, by 'file:line' of the
    Python code that made them."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with torch.no_grad():
                gen.generate([model], sample)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    reads = collections.Counter()
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            reads[f"{os.path.relpath(w.filename, SEQFUSE_DIR)}:{w.lineno}"] += 1
    return reads


def _seqfuse_reads(reads: collections.Counter) -> int:
    return sum(n for where, n in reads.items() if where.startswith("seqfuse" + os.sep))


def test_step_loop_reads_back_only_every_few_steps():
    """Forcing 40 more steps (min_len) adds about 2 host reads per
    ``compact_every`` steps to seqfuse's own code, where stock's search reads
    back on every step."""
    model, d = random_transformer(vocab=200, seed=3, perturb=True)
    model = model.cuda()
    sample = on_cuda(random_sample(d, bsz=8, seed=3))
    counts = {}
    for name, cls in (("stock", StockGenerator), ("seqfuse", SequenceGenerator)):
        for min_len in (20, 60):
            gen = cls([model], d, beam_size=4, min_len=min_len, max_len_b=min_len + 4)
            gen.generate([model], sample)  # warm-up (kernels, allocator)
            counts[name, min_len] = _host_reads(gen, model, sample)
    stock_extra = sum(counts["stock", 60].values()) - sum(counts["stock", 20].values())
    ours_extra = _seqfuse_reads(counts["seqfuse", 60]) - _seqfuse_reads(counts["seqfuse", 20])
    every = SequenceGenerator([model], d, beam_size=4).compact_every or 4
    detail = {k: dict(v) for k, v in counts.items()}
    assert stock_extra >= 40, f"the sync counter does not see stock's reads: {detail}"
    assert ours_extra <= 2 * (40 // every) + 2, f"host reads in the step loop: {detail}"
