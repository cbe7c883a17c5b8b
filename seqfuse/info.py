"""``python -m seqfuse.info``: versions, build and backend availability."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def cpu_description() -> str:
    """The CPU as benchmarks record it: model name, x86 family/model (which
    tells CPU generations with one model name apart, e.g. AMD EPYC Zen 4 =
    family 25, Zen 5 = family 26), widest vector extension, logical CPUs."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    parts = []
    if "cpu family" in fields and "model" in fields:
        parts.append(f"family {fields['cpu family']} model {fields['model']}")
    flags = fields.get("flags", "").split()
    isa = next((f for f in ("avx512f", "avx2") if f in flags), None)
    if isa:
        parts.append(isa + (" avx512_bf16" if "avx512_bf16" in flags else ""))
    parts.append(f"{os.cpu_count()} CPUs")
    return f"{name} ({', '.join(parts)})"


def source_revision() -> str:
    """The git commit of the checkout seqfuse runs from ("-dirty" when tracked
    files differ from it), or "unknown" outside a git checkout: benchmark and
    fuzzing results record it."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if rev.returncode != 0 or not rev.stdout.strip():
        return "unknown"
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


# The probe's product: a decoder step's vocabulary projection at batch 64,
# beam 5 on the Multi30k model ([320, 256] x [256, 8003]).
_PROBE_SHAPE = (320, 256, 8003)


def cpu_probe(threads: int | None = None, seconds: float = 0.3) -> dict:
    """This CPU's matrix-multiply rate right now (torch's GEMM, GFLOP/s) on one
    thread and on ``threads`` (torch's count when None), and the ratio of the
    two: the yardstick that says whether a benchmark ran on free CPUs. On a
    shared machine the second CPU can be busy with other work, and then every
    multi-threaded figure (stock's and seqfuse's alike) moves with it."""
    import time

    import torch

    m, k, n = _PROBE_SHAPE
    count = threads or torch.get_num_threads()
    old = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    rates = {}
    try:
        for label, t in (("one_thread", 1), ("threads", count)):
            torch.set_num_threads(t)
            torch.mm(a, b)
            reps, start = 0, time.perf_counter()
            while True:
                torch.mm(a, b)
                reps += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            rates[label] = 2 * m * k * n * reps / elapsed / 1e9
    finally:
        torch.set_num_threads(old)
    return {
        "threads": count,
        "gflops_one_thread": round(rates["one_thread"], 1),
        "gflops_threads": round(rates["threads"], 1),
        "scaling": round(rates["threads"] / rates["one_thread"], 2),
    }


def probe_warning(before: dict, after: dict) -> str | None:
    """One line saying why a run's figures may not hold on a quiet machine
    (its threads did not scale, or the CPU's rate moved during the run,
    by ``cpu_probe`` before and after it), or None when neither happened."""
    problems = []
    for when, p in (("before", before), ("after", after)):
        if p["threads"] > 1 and p["scaling"] < 0.75 * p["threads"]:
            problems.append(
                f"{when} the run {p['threads']} threads multiplied matrices {p['scaling']}x "
                "as fast as one"
            )
    lo, hi = sorted((before["gflops_threads"], after["gflops_threads"]))
    if hi > 1.15 * lo:
        problems.append(
            f"the {before['threads']}-thread GEMM rate went from {before['gflops_threads']} to "
            f"{after['gflops_threads']} GFLOP/s during the run"
        )
    if not problems:
        return None
    return (
        "machine check: "
        + "; ".join(problems)
        + " (CPUs shared with other work or throttled: ratios may differ on a quiet machine)"
    )


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:  # report, never fail
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80]})"


def _hf_integration() -> str:
    """Whether seqfuse.optimize can patch generate with this transformers."""
    try:
        from transformers.generation.utils import GenerationMixin

        from integrations.hf import _HELPERS
    except Exception as e:  # report, never fail
        return f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    missing = [h for h in _HELPERS if not hasattr(GenerationMixin, h)]
    if missing:
        return f"unavailable: this transformers has no {', '.join(missing)}"
    return "available (seqfuse.optimize)"


def _packed_gemm() -> str:
    """Which ISA the fused layers' packed-weight GEMM runs with."""
    from seqfuse import _ext

    if _ext._C is None:
        return "unavailable: no compiled extension (torch's F.linear runs)"
    import torch

    cap = torch.ops.seqfuse.linear_capability()
    return f"available ({cap})" if cap else "unavailable: needs AVX2 or AVX-512 (F.linear runs)"


# (label, module, function, arguments): the code each exact one-call step mirrors
_STEP_CHECKS = (
    ("fairseq", "seqfuse.layers.exact_step", "_library_problem", ()),
    ("transformers", "integrations.hf_exact_step", "_library_problem", ()),
    ("GPT-2", "integrations.hf_gpt2_step", "_gpt2_library_problem", ()),
    ("T5", "integrations.hf_t5_step", "_t5_library_problem", ()),
    ("Llama", "integrations.hf_llama_step", "_llama_library_problem", ("Llama",)),
    ("Qwen2", "integrations.hf_llama_step", "_llama_library_problem", ("Qwen2",)),
    ("Mistral", "integrations.hf_llama_step", "_llama_library_problem", ("Mistral",)),
    ("FSMT", "integrations.hf_fsmt_step", "_fsmt_library_problem", ()),
)


def _exact_steps() -> str:
    """Whether the code the exact one-call decoder steps mirror is the verified one."""
    import importlib

    out = []
    for label, module, function, args in _STEP_CHECKS:
        try:
            why = getattr(importlib.import_module(module), function)(*args)
            out.append(f"{label}: " + ("verified" if why is None else why))
        except Exception as e:  # report, never fail
            out.append(f"{label}: unavailable ({type(e).__name__})")
    return "; ".join(out)


def _fused_stacks() -> str:
    """Whether the fused mode runs its layer stacks in one C++ call."""
    from seqfuse import _ext
    from seqfuse.layers import fused_step

    if not _ext.env_flag(fused_step.FUSED_STEP_ENV, True):
        return f"off ({fused_step.FUSED_STEP_ENV}=0)"
    if not _ext.cpu_available()[0]:
        return "unavailable (no extension)"
    try:
        from fairseq.models.transformer import TransformerEncoderBase

        from seqfuse.source_shape import shape_of

        encoder = shape_of(TransformerEncoderBase.forward_scriptable) == fused_step._ENCODER_FORWARD
    except Exception as e:  # report, never fail
        return f"decoder step; encoder unavailable ({type(e).__name__})"
    return "decoder step and encoder" + ("" if encoder else " (encoder: fairseq code not verified)")


def collect() -> dict:
    import torch

    import seqfuse
    from seqfuse import _ext

    cpu_ok, cpu_why = _ext.cpu_available()
    cuda_ok, cuda_why = _ext.cuda_available()
    return {
        "seqfuse": seqfuse.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch.cuda": str(torch.version.cuda),
        "fairseq": _version("fairseq"),
        "transformers": _version("transformers"),
        "extension build": _ext.build_info() or "-",
        "backend torch reference": "available",
        "backend cpu extension": "available" if cpu_ok else f"unavailable: {cpu_why}",
        "backend cuda extension": "available" if cuda_ok else f"unavailable: {cuda_why}",
        "hf integration": _hf_integration(),
        "packed GEMM (fused layers)": _packed_gemm(),
        "exact decoder steps": _exact_steps(),
        "fused stacks, one call": _fused_stacks(),
        "SEQFUSE_DISABLE": "set" if _ext.disabled() else "unset",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--short", action="store_true", help="one line")
    args = p.parse_args(argv)
    info = collect()
    if args.short:
        print(
            f"seqfuse {info['seqfuse']} | torch {info['torch']} | fairseq {info['fairseq']} | "
            f"transformers {info['transformers']} | ext: {info['extension build'] or '-'}"
        )
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}} : {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
