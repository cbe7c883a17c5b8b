"""In-place class swaps shared by the integrations.

seqfuse changes what a model object does by changing its class to a subclass
of its own class (a mixin first): the object, its parameters, hooks and
``state_dict`` stay; ``isinstance`` still holds. The subclass keeps the base's
name, and where libraries key registries by ``str(cls)`` (transformers), its
module and qualname too.

It also keeps, per decoder, what a beam-search reorder visits (found once,
found anew after any module or parameter registration).
"""

from __future__ import annotations

import torch

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


# Bumped whenever a parameter or submodule is registered on any module (torch
# calls these global hooks from register_parameter / add_module, which
# attribute assignment goes through): what is cached per module below and in
# seqfuse.layers.fused_step is found anew after any such change.
_structure = [0]


def _structure_changed(*_args) -> None:
    _structure[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_structure_changed)
torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)


def cached_for_structure(module, attr: str, build):
    """``build(module)``, kept in the module's ``__dict__`` until a parameter
    or submodule is registered anywhere."""
    hit = module.__dict__.get(attr)
    if hit is not None and hit[0] == _structure[0]:
        return hit[1]
    value = build(module)
    module.__dict__[attr] = (_structure[0], value)
    return value


def reorder_incremental_state(decoder, incremental_state, new_order, skip=()):
    """fairseq's ``reorder_incremental_state_scripting`` (every module with a
    ``reorder_incremental_state``, in ``modules()`` order), the module list
    found once per decoder instead of by a walk per step. A fairseq
    ``MultiheadAttention`` that holds no state in ``incremental_state`` (the
    ones inside seqfuse's fused layers, which keep their own caches) is
    skipped: its reorder would only store an empty buffer, which reads back
    the same as none. So are the modules in ``skip`` (whose reorder the
    caller defers)."""
    for module, state_key in reorder_modules(decoder):
        if skip and any(module is m for m in skip):
            continue
        if state_key is not None and (
            incremental_state is None or state_key not in incremental_state
        ):
            continue
        result = module.reorder_incremental_state(incremental_state, new_order)
        if result is not None:
            incremental_state = result


def reorder_modules(decoder) -> list:
    """The modules ``reorder_incremental_state_scripting`` visits, found once:
    ``(module, its incremental_state key when it is a stock
    MultiheadAttention, else None)``."""
    return cached_for_structure(decoder, "_seqfuse_reorder", _find_reorder_modules)


def _find_reorder_modules(decoder) -> list:
    from fairseq.modules.multihead_attention import MultiheadAttention

    stock = MultiheadAttention.reorder_incremental_state
    return [
        (
            m,
            f"{m._incremental_state_id}.attn_state"
            if getattr(type(m), "reorder_incremental_state", None) is stock
            else None,
        )
        for m in decoder.modules()
        if hasattr(m, "reorder_incremental_state")
    ]
