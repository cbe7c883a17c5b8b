"""In-place class swaps shared by the integrations.

seqfuse changes what a model object does by changing its class to a subclass
of its own class (a mixin first): the object, its parameters, hooks and
``state_dict`` stay; ``isinstance`` still holds. The subclass keeps the base's
name, and where libraries key registries by ``str(cls)`` (transformers), its
module and qualname too.
"""

from __future__ import annotations

_SUBCLASSES: dict[tuple[type, type, bool], type] = {}


def mixed_subclass(mixin: type, base: type, *, as_base: bool = False) -> type:
    """``class <base name>(mixin, base)``, made once per pair. With ``as_base``
    it also carries the base's ``__module__`` and ``__qualname__``."""
    key = (mixin, base, as_base)
    sub = _SUBCLASSES.get(key)
    if sub is None:
        attrs = {"__module__": base.__module__ if as_base else mixin.__module__}
        if as_base:
            attrs["__qualname__"] = base.__qualname__
        sub = type(base.__name__, (mixin, base), attrs)
        _SUBCLASSES[key] = sub
    return sub


def reorder_incremental_state(decoder, incremental_state, new_order):
    """fairseq's ``reorder_incremental_state_scripting`` (every module with a
    ``reorder_incremental_state``, in ``modules()`` order), the module list
    found once per decoder instead of by a walk per step. A fairseq
    ``MultiheadAttention`` that holds no state in ``incremental_state`` (the
    ones inside seqfuse's fused layers, which keep their own caches) is
    skipped: its reorder would only store an empty buffer, which reads back
    the same as none."""
    mods = decoder.__dict__.get("_seqfuse_reorder")
    if mods is None:
        from fairseq.modules.multihead_attention import MultiheadAttention

        stock = MultiheadAttention.reorder_incremental_state
        # (module, the incremental_state key of its state when it is a stock
        # MultiheadAttention, else None)
        mods = [
            (
                m,
                f"{m._incremental_state_id}.attn_state"
                if getattr(type(m), "reorder_incremental_state", None) is stock
                else None,
            )
            for m in decoder.modules()
            if hasattr(m, "reorder_incremental_state")
        ]
        decoder.__dict__["_seqfuse_reorder"] = mods
    for module, state_key in mods:
        if state_key is not None and (
            incremental_state is None or state_key not in incremental_state
        ):
            continue
        result = module.reorder_incremental_state(incremental_state, new_order)
        if result is not None:
            incremental_state = result
