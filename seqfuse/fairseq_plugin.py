"""fairseq integration: what ``--user-dir plugins/seqfuse_fairseq`` installs.

Importing the plugin calls :func:`install`, which

- registers ``--arch seqfuse_transformer`` (and one ``seqfuse_<arch>`` for every
  stock ``transformer*`` size variant) and ``--task seqfuse_translation``;
- hooks ``FairseqTask.build_generator``, the one place fairseq-generate,
  fairseq-interactive, ``fairseq-train --eval-bleu`` (``TranslationTask.build_model``)
  and the hub interface get their generator from (and
  ``translation_from_pretrained_bart``'s own ``build_generator``). When the
  options and the model are ones seqfuse reproduces exactly, the caller gets
  ``seqfuse.generation.SequenceGenerator`` (same constructor as stock) and the
  model's layers are swapped for fused ones (models in eval mode only);
  otherwise the stock generator over the untouched model, after one warning
  line naming the reason;
- lets fairseq checkpoints load under torch's weights-only default: it allows
  the few non-tensor types they pickle (``argparse.Namespace``, numpy arrays
  and scalars), nothing else;
- keeps the last, incomplete batch that fairseq's ``batch_by_size`` drops when
  its size is not a multiple of ``--required-batch-size-multiple`` (fairseq
  issue #5036), for every iterator except the training one: no sentence is
  lost in generation or validation, and training sees stock's batches.

``SEQFUSE_DISABLE=1`` installs none of the hooks: fairseq behaves as stock. The
registered names stay (as plain aliases of ``transformer`` and ``translation``)
so that the same command line still parses.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import logging
import os

import numpy as np
from fairseq.models import (
    ARCH_CONFIG_REGISTRY,
    ARCH_MODEL_REGISTRY,
    MODEL_REGISTRY,
    register_model,
    register_model_architecture,
)
from fairseq.models.transformer import TransformerModel
from fairseq.tasks import register_task
from fairseq.tasks.fairseq_task import FairseqTask
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from seqfuse import _ext
from seqfuse.generation.sequence_generator import FALLBACK_PREFIX

logger = logging.getLogger(__name__)


# Options that select something other than plain beam search, in the order
# fairseq's build_generator reads them: (feature, option, attribute, test on
# the value). A generator that reproduces one exactly lists the feature in its
# ``SUPPORTED_FEATURES`` (also "ensemble", "lm_fusion",
# "prefix_allowed_tokens_fn" below); everything else runs stock.
_SEARCH_OPTIONS = (
    ("sampling", "--sampling", "sampling", lambda v: bool(v)),
    ("diverse_beam_groups", "--diverse-beam-groups", "diverse_beam_groups", lambda v: v > 0),
    ("match_source_len", "--match-source-len", "match_source_len", lambda v: bool(v)),
    ("diversity_rate", "--diversity-rate", "diversity_rate", lambda v: v > -1),
    ("constraints", "--constraints", "constraints", lambda v: bool(v)),
    ("prefix_tokens", "--prefix-size", "prefix_size", lambda v: v > 0),
    # Served by seqfuse's SequenceGeneratorWithAlignment (same search).
    ("print_alignment", "--print-alignment", "print_alignment", lambda v: bool(v)),
    # seqfuse's loop on the stock layers (the one-call step and the fused
    # layers refuse dropout at inference): the same random draws as stock's.
    ("retain_dropout", "--retain-dropout", "retain_dropout", lambda v: bool(v)),
)

_STOCK_BUILD_GENERATOR = FairseqTask.build_generator
_installed = False
_announced = False
_warned: set[str] = set()
_patches: list[tuple[object, str, object]] = []  # (owner, attribute, stock value)
_added_safe_globals: list[object] = []
# True while fairseq's Trainer builds its training iterator: that one keeps
# stock batching so that training runs see exactly the batches stock sees.
_training_batches = contextvars.ContextVar("seqfuse_training_batches", default=False)


def install() -> None:
    """Register the seqfuse names and install the hooks (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    register_names()
    _warned.clear()
    if _ext.disabled():
        logger.info("seqfuse: SEQFUSE_DISABLE is set, the plugin is off (stock fairseq)")
        return
    _allow_checkpoint_globals()
    _hook_build_generator()
    _hook_bart_task()
    _hook_batching()
    _hook_import_user_module()


def uninstall() -> None:
    """Undo :func:`install`'s hooks (the registered names stay)."""
    global _installed, _announced
    while _patches:
        owner, name, original = _patches.pop()
        setattr(owner, name, original)
    if _added_safe_globals:
        import torch

        added = set(map(id, _added_safe_globals))
        kept = [g for g in torch.serialization.get_safe_globals() if id(g) not in added]
        torch.serialization.clear_safe_globals()
        if kept:
            torch.serialization.add_safe_globals(kept)
        _added_safe_globals.clear()
    _installed = False
    _announced = False


def installed() -> bool:
    """True when the hooks are in place (installed and not disabled)."""
    return bool(_patches)


def _patch(owner, name: str, new) -> None:
    _patches.append((owner, name, getattr(owner, name)))
    setattr(owner, name, new)


# --------------------------------------------------------------------------
# Generator selection


def _warn_once(line: str) -> None:
    if line not in _warned:
        _warned.add(line)
        logger.warning(line)


def _warn_fallback(reason: str) -> None:
    _warn_once(FALLBACK_PREFIX + reason)


def _supported_models():
    """(model, encoder, decoder) classes the seqfuse path reproduces exactly."""
    from fairseq.models.bart import BARTModel
    from fairseq.models.transformer import (
        TransformerDecoder,
        TransformerDecoderBase,
        TransformerEncoder,
        TransformerEncoderBase,
        TransformerModel,
        TransformerModelBase,
    )

    models = (TransformerModelBase, TransformerModel, SeqfuseTransformerModel, BARTModel)
    encoders = (TransformerEncoderBase, TransformerEncoder)
    decoders = (TransformerDecoderBase, TransformerDecoder)
    return models, encoders, decoders


def _model_reason(model) -> str | None:
    models, encoders, decoders = _supported_models()
    name = type(model).__name__
    if type(model) not in models:
        return f"model {name} is not a transformer encoder-decoder"
    for part, allowed in (("encoder", encoders), ("decoder", decoders)):
        cls = type(getattr(model, part, None))
        if cls not in allowed and not _is_seqfuse_class(cls):
            return f"model {name} has {part} {cls.__name__}"
    return None


def _is_seqfuse_class(cls) -> bool:
    """Classes seqfuse's fused layers put in place of stock ones."""
    return cls.__module__.startswith("seqfuse.layers.")


def fallback_reason(
    gen_cls, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_fn=None
) -> str | None:
    """Why the stock generator must run, or None when seqfuse's reproduces it."""
    supported = frozenset(getattr(gen_cls, "SUPPORTED_FEATURES", ()))
    if seq_gen_cls is not None:
        return f"the task asks for {seq_gen_cls.__name__}"
    for feature, option, attr, active in _SEARCH_OPTIONS:
        value = getattr(args, attr, None)
        if value is not None and active(value) and feature not in supported:
            return f"{option} is not supported"
    if prefix_fn is None:
        prefix_fn = getattr(args, "prefix_allowed_tokens_fn", None)
    if prefix_fn is not None and "prefix_allowed_tokens_fn" not in supported:
        return "prefix_allowed_tokens_fn is not supported"
    extra = extra_gen_cls_kwargs or {}
    if extra.get("lm_model") is not None and "lm_fusion" not in supported:
        return "--lm-path (language model fusion) is not supported"
    if len(models) != 1 and "ensemble" not in supported:
        return f"an ensemble of {len(models)} models is not supported"
    for model in models:
        reason = _model_reason(model)
        if reason is not None:
            return reason
    return None


# The fused layers agree with fairseq's to 1e-5 in fp32, not bit for bit, so
# printed scores can differ in their last digits: they are opt-in. The search
# (seqfuse's generator) is exact either way and always on.
# The exact decoder step (seqfuse/layers/exact_step.py) is bit-identical to
# the stock layers, so it is on by default; SEQFUSE_EXACT_STEP=0 turns it off.
FUSED_LAYERS_ENV = _ext.FUSED_LAYERS_ENV
EXACT_STEP_ENV = _ext.EXACT_STEP_ENV


def _exact_step(model) -> str | None:
    """Give the model's decoder the one-call exact incremental step; returns
    why not (the stock layers then run every step), or None."""
    if not _ext.env_flag(EXACT_STEP_ENV, True):
        return None
    decoder = getattr(model, "decoder", None)
    if decoder is None or getattr(decoder, "_seqfuse_exact_step", False):
        return None
    from seqfuse.layers.exact_step import enable_exact_step

    return enable_exact_step(decoder)


def _fuse_layers(model) -> str | None:
    """Swap in fused layers (same parameters) when SEQFUSE_FUSED_LAYERS=1,
    else give the decoder the exact one-call step; returns why not, or None.

    Models being trained (``fairseq-train --eval-bleu`` builds its generator
    around the training model) keep their layers; their decoder gets the
    exact step, which only runs in eval mode without gradients.
    """
    if getattr(model, "_seqfuse_fused", False):
        return None
    if model.training or not _ext.env_flag(FUSED_LAYERS_ENV, False):
        why = _exact_step(model)
        if why is not None:
            logger.info("seqfuse: exact decoder step not used: %s", why)
        return None
    try:
        from seqfuse.layers.fairseq import optimize_fairseq_model
    except ModuleNotFoundError as err:
        if err.name not in ("seqfuse.layers", "seqfuse.layers.fairseq"):
            raise
        logger.debug("seqfuse: fused fairseq layers are not available: %s", err)
        return None
    ok, reason = optimize_fairseq_model(model)
    if not ok:
        _exact_step(model)  # the stock layers, with the exact one-call step
        return reason or "the fused layers do not support this model"
    model._seqfuse_fused = True
    return None


def select_generator(
    models,
    args,
    seq_gen_cls=None,
    extra_gen_cls_kwargs=None,
    prefix_allowed_tokens_fn=None,
    alignment=False,
):
    """seqfuse's generator class when it reproduces this run exactly (the
    models' layers are then fused), else None after one warning naming why.
    ``alignment``: the class that also extracts alignments, as stock's
    ``FairseqTask.build_generator`` picks for ``--print-alignment``."""
    from seqfuse.generation import SequenceGenerator, SequenceGeneratorWithAlignment

    reason = fallback_reason(
        SequenceGenerator,
        models,
        args,
        seq_gen_cls=seq_gen_cls,
        extra_gen_cls_kwargs=extra_gen_cls_kwargs,
        prefix_fn=prefix_allowed_tokens_fn,
    )
    if reason is None:
        for model in models:
            why_not = _fuse_layers(model)
            if why_not is not None:
                # The generator is exact on stock layers too: keep it.
                _warn_once(f"seqfuse: fused layers not used: {why_not}")
    if reason is not None:
        _warn_fallback(reason)
        return None
    global _announced
    cls = SequenceGeneratorWithAlignment if alignment else SequenceGenerator
    if not _announced:
        _announced = True
        fused = all(getattr(m, "_seqfuse_fused", False) for m in models)
        exact = all(
            getattr(getattr(m, "decoder", None), "_seqfuse_exact_step", False) for m in models
        )
        logger.info(
            "seqfuse: generating with seqfuse.generation.%s (layers: %s)",
            cls.__name__,
            "fused" if fused else ("stock, exact one-call decoder step" if exact else "stock"),
        )
    return cls


def build_generator(
    task,
    stock_build,
    models,
    args,
    seq_gen_cls=None,
    extra_gen_cls_kwargs=None,
    prefix_allowed_tokens_fn=None,
):
    """``FairseqTask.build_generator`` with seqfuse's generator where exact.

    ``stock_build`` is the stock ``FairseqTask.build_generator``; it builds the
    search strategy and passes every option through, so the seqfuse generator
    receives exactly the constructor arguments stock would.
    """
    from fairseq.sequence_generator import SequenceGenerator as StockGenerator

    def stock(cls=seq_gen_cls):
        return stock_build(
            task,
            models,
            args,
            seq_gen_cls=cls,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )

    if getattr(args, "score_reference", False):
        return stock()  # a scorer, not a generator
    if seq_gen_cls is StockGenerator:
        seq_gen_cls = None
    alignment = getattr(args, "print_alignment", None)
    cls = select_generator(
        models,
        args,
        seq_gen_cls,
        extra_gen_cls_kwargs,
        prefix_allowed_tokens_fn,
        alignment=bool(alignment),
    )
    if cls is None:
        return stock()
    if alignment:
        # What stock's build_generator does for --print-alignment, with
        # seqfuse's class in place of fairseq's.
        extra_gen_cls_kwargs = {
            **(extra_gen_cls_kwargs or {}),
            "print_alignment": alignment,
        }
    return stock(cls)


def _hook_bart_task() -> None:
    """``translation_from_pretrained_bart`` builds fairseq's SequenceGenerator
    itself (with the target language tag as EOS) instead of asking
    ``FairseqTask.build_generator``: it gets seqfuse's class in the same call."""
    from fairseq import sequence_generator
    from fairseq.tasks.translation_from_pretrained_bart import (
        TranslationFromPretrainedBARTTask,
    )

    stock_build = TranslationFromPretrainedBARTTask.build_generator

    @functools.wraps(stock_build)
    def hooked(self, models, args, **unused):
        if getattr(args, "score_reference", False):
            return stock_build(self, models, args, **unused)
        cls = select_generator(models, args)
        if cls is None:
            return stock_build(self, models, args, **unused)
        # The stock method imports the class from fairseq.sequence_generator
        # when it runs; that name is seqfuse's for the duration of this call.
        stock_cls = sequence_generator.SequenceGenerator
        sequence_generator.SequenceGenerator = cls
        try:
            return stock_build(self, models, args, **unused)
        finally:
            sequence_generator.SequenceGenerator = stock_cls

    _patch(TranslationFromPretrainedBARTTask, "build_generator", hooked)


def _hook_build_generator() -> None:
    stock_build = FairseqTask.build_generator

    @functools.wraps(stock_build)
    def hooked(
        self,
        models,
        args,
        seq_gen_cls=None,
        extra_gen_cls_kwargs=None,
        prefix_allowed_tokens_fn=None,
    ):
        return build_generator(
            self,
            stock_build,
            models,
            args,
            seq_gen_cls=seq_gen_cls,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )

    _patch(FairseqTask, "build_generator", hooked)


# --------------------------------------------------------------------------
# Checkpoint loading


def _checkpoint_globals() -> list:
    """What fairseq checkpoints pickle besides tensors and containers: the
    command-line ``argparse.Namespace`` and, from training, numpy arrays and
    scalars of plain numeric dtypes (meters in ``extra_state``)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    numeric = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [
        argparse.Namespace,
        multiarray._reconstruct,
        multiarray.scalar,
        np.ndarray,
        np.dtype,
        *dict.fromkeys(numeric),
    ]


def _allow_checkpoint_globals() -> None:
    """Allow exactly :func:`_checkpoint_globals` under torch's weights-only
    unpickler, so fairseq checkpoints load without turning that check off."""
    import torch

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:
        return
    present = set(map(id, torch.serialization.get_safe_globals()))
    new = [g for g in _checkpoint_globals() if id(g) not in present]
    add(new)
    _added_safe_globals.extend(new)


# --------------------------------------------------------------------------
# Batching: keep the last incomplete batch


def _hook_batching() -> None:
    from fairseq import trainer
    from fairseq.data import data_utils

    stock_batch_by_size = data_utils.batch_by_size

    @functools.wraps(stock_batch_by_size)
    def batch_by_size(
        indices,
        num_tokens_fn,
        num_tokens_vec=None,
        max_tokens=None,
        max_sentences=None,
        required_batch_size_multiple=1,
        fixed_shapes=None,
    ):
        if not isinstance(indices, np.ndarray):
            indices = np.fromiter(indices, dtype=np.int64, count=-1)
        batches = stock_batch_by_size(
            indices,
            num_tokens_fn,
            num_tokens_vec=num_tokens_vec,
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            required_batch_size_multiple=required_batch_size_multiple,
            fixed_shapes=fixed_shapes,
        )
        if fixed_shapes is not None or _training_batches.get():
            return batches
        # Stock batches are consecutive slices of `indices`; what is missing at
        # the end is the one batch stock dropped.
        kept = sum(len(b) for b in batches)
        if kept < len(indices):
            batches = list(batches) + [np.asarray(indices[kept:], dtype=np.int64)]
        return batches

    _patch(data_utils, "batch_by_size", batch_by_size)

    stock_train_iterator = trainer.Trainer.get_train_iterator

    @functools.wraps(stock_train_iterator)
    def get_train_iterator(self, *args, **kwargs):
        token = _training_batches.set(True)
        try:
            itr = stock_train_iterator(self, *args, **kwargs)
        finally:
            _training_batches.reset(token)
        sampler = getattr(itr, "batch_sampler", None)
        if callable(sampler):  # batches rebuilt every epoch, later
            itr.batch_sampler = _as_training(sampler)
        return itr

    _patch(trainer.Trainer, "get_train_iterator", get_train_iterator)


def _as_training(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        token = _training_batches.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _training_batches.reset(token)

    return wrapped


# --------------------------------------------------------------------------
# --user-dir when seqfuse_fairseq was already imported from elsewhere


def _hook_import_user_module() -> None:
    """fairseq refuses a ``--user-dir`` whose basename names an already imported
    module at another path. An installed ``seqfuse_fairseq`` and the repository's
    ``plugins/seqfuse_fairseq`` are the same plugin: accept either."""
    from fairseq import utils

    stock_import = utils.import_user_module

    @functools.wraps(stock_import)
    def import_user_module(args):
        path = getattr(args, "user_dir", None)
        if path is not None and _is_seqfuse_plugin_dir(path):
            logger.debug("seqfuse: --user-dir=%s: the seqfuse plugin is already imported", path)
            return None
        return stock_import(args)

    import_user_module.memo = getattr(stock_import, "memo", set())
    _patch(utils, "import_user_module", import_user_module)


def _is_seqfuse_plugin_dir(path: str) -> bool:
    path = os.path.abspath(path)
    if os.path.basename(os.path.normpath(path)) != "seqfuse_fairseq":
        return False
    init = os.path.join(path, "__init__.py")
    try:
        with open(init, encoding="utf-8") as f:
            return "seqfuse.fairseq_plugin" in f.read()
    except OSError:
        return False


# --------------------------------------------------------------------------
# Registered names


class SeqfuseTransformerModel(TransformerModel):
    """fairseq's ``transformer``: same parameters, same state_dict; generation
    goes through seqfuse (fused layers and generator) when the plugin is on."""


class SeqfuseTranslationTask(TranslationTask):
    """fairseq's ``translation`` task, generating with seqfuse's generator."""

    def build_generator(
        self,
        models,
        args,
        seq_gen_cls=None,
        extra_gen_cls_kwargs=None,
        prefix_allowed_tokens_fn=None,
    ):
        kwargs = dict(
            seq_gen_cls=seq_gen_cls,
            extra_gen_cls_kwargs=extra_gen_cls_kwargs,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
        )
        if _ext.disabled():
            return _STOCK_BUILD_GENERATOR(self, models, args, **kwargs)
        return build_generator(self, _STOCK_BUILD_GENERATOR, models, args, **kwargs)


def register_names() -> None:
    """Register ``seqfuse_transformer*`` archs and the ``seqfuse_translation`` task."""
    if "seqfuse_transformer" in MODEL_REGISTRY:
        return
    register_model("seqfuse_transformer")(SeqfuseTransformerModel)
    for arch, model_cls in list(ARCH_MODEL_REGISTRY.items()):
        if model_cls is TransformerModel and arch.startswith("transformer"):
            register_model_architecture("seqfuse_transformer", "seqfuse_" + arch)(
                ARCH_CONFIG_REGISTRY[arch]
            )
    register_task("seqfuse_translation", dataclass=TranslationConfig)(SeqfuseTranslationTask)
