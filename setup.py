"""Build seqfuse and its one compiled extension, ``seqfuse._C``.

The C++ (CPU, OpenMP) part is always built. The CUDA part is built when torch
has CUDA and nvcc is found, or when FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured (torch's BuildExtension reads both). Nothing is compiled
at import time.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)


def _version() -> str:
    ns: dict = {}
    with open(os.path.join(ROOT, "seqfuse", "version.py")) as f:
        exec(f.read(), ns)
    return ns["__version__"]


def _want_cuda(torch) -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    if os.environ.get("SEQFUSE_NO_CUDA", "0") == "1":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and (
        CUDA_HOME is not None or shutil.which("nvcc") is not None
    )


# Sources compiled once per CPU capability, each with its own flags (torch
# picks its kernels the same way; see csrc/cpu/capability/row_lse_impl.h).
CAPABILITY_FLAGS = {
    "default": [],
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
}


def _capability_objects(build_ext, ext) -> list:
    import platform

    import torch
    from torch.utils.cpp_extension import include_paths

    caps = CAPABILITY_FLAGS if platform.machine() in ("x86_64", "AMD64") else {"default": []}
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    objects = []
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    for cap, flags in caps.items():
        # Every csrc/cpu/capability/<kernel>_<cap>.cc (a kernel may skip a capability).
        for src in sorted(glob.glob(os.path.join("csrc", "cpu", "capability", f"*_{cap}.cc"))):
            objects += build_ext.compiler.compile(
                [src],
                output_dir=build_ext.build_temp,
                include_dirs=include_paths() + ext.include_dirs,
                extra_postargs=["-O3", "-std=c++17", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
                + openmp
                + flags,
            )
    return objects


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocations
        return [], {}

    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    # Bindings: csrc/*.cpp (CPU; one TORCH_LIBRARY in bindings.cpp, fragments
    # elsewhere) and csrc/cuda_*.cpp (CUDA builds only).
    bindings = [p for p in rel("csrc/*.cpp") if not os.path.basename(p).startswith("cuda_")]
    cpu_sources = rel("csrc/cpu/*.cc") + bindings
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx_flags = ["-O3", "-std=c++17", "-DNDEBUG"] + openmp
    include_dirs = [os.path.join(ROOT, "csrc")]
    if _want_cuda(torch):
        sources = cpu_sources + rel("csrc/cuda/*.cu") + rel("csrc/cuda_*.cpp")
        ext = CUDAExtension(
            "seqfuse._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("SEQFUSE_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "seqfuse._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
        )

    class Build(BuildExtension):
        def build_extensions(self):
            for e in self.extensions:
                e.extra_objects = list(e.extra_objects or []) + _capability_objects(self, e)
            super().build_extensions()

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="seqfuse",
    version=_version(),
    description="Drop-in fused inference for fairseq and Hugging Face sequence models",
    python_requires=">=3.10",
    packages=find_packages(include=["seqfuse", "seqfuse.*", "integrations", "integrations.*"])
    + ["seqfuse_fairseq"],
    package_dir={"seqfuse_fairseq": "plugins/seqfuse_fairseq"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch==2.13.0"],
    entry_points={
        "console_scripts": [
            "seqfuse-generate=seqfuse.cli:generate",
            "seqfuse-interactive=seqfuse.cli:interactive",
            "seqfuse-train=seqfuse.cli:train",
            "seqfuse-bleu=seqfuse.cli:bleu",
        ]
    },
    zip_safe=False,
)
