#!/usr/bin/env bash
# Prepares here, on a machine without a GPU, what a lent GPU machine needs for
# scripts/gpu_check.sh (docs/GPU.md), so that the device time goes to tests and
# benchmarks:
#   wheels    .whl/: fairseq-fixed and the packages the GPU image lacks (cp312)
#   carry     .carry/: the Multi30k model and data from ../shared, Python's headers
#   prebuilt  .carry/prebuilt/_C*.so: seqfuse._C built here against the GPU
#             image's torch (2.11.0+cu130, nvcc 13, sm_90), debug info stripped;
#             gpu_check.sh's 'prebuilt' step uses it when it loads there
#   dry       gpu_check.sh's wheels/info/test/bench steps here, in an environment
#             like the GPU image's (Python 3.12, torch 2.11, transformers
#             $DRY_TRANSFORMERS, fairseq from .whl/ in /tmp/site): the GPU tests
#             skip and the CUDA benchmarks stop at once, but import and path
#             errors show; then scripts/benchmark.py on the CPU on a few sentences
# Usage: bash scripts/gpu_prepare.sh [step ...]   (default: wheels carry prebuilt)
# Environment: PY312 (a Python 3.12; pyenv's by default), WORK (/tmp/seqfuse_gpu_prep:
# the venv with torch 2.11, about 5 GB, and the build), CUDA_HOME (/usr/local/cuda),
# DRY_TRANSFORMERS (5.17.0, the version last seen on the GPU image).
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(wheels carry prebuilt)
PY312=${PY312:-$(PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || command -v python3.12)}
WORK=${WORK:-/tmp/seqfuse_gpu_prep}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
DRY_TRANSFORMERS=${DRY_TRANSFORMERS:-5.17.0}
VENV=$WORK/v312
mkdir -p "$WORK"

exclude() { # keep a path out of git here (the device tool carries it)
  mkdir -p .git/info
  grep -qx "$1" .git/info/exclude 2>/dev/null || echo "$1" >>.git/info/exclude
}

venv() { # Python 3.12 with the GPU image's torch (its PyPI wheel is the cu130 build)
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY312" -m venv "$VENV"
  fi
  "$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.__version__ != "2.11.0+cu130")' 2>/dev/null ||
    "$VENV/bin/pip" install -q torch==2.11.0 numpy pybind11 ninja setuptools wheel
}

step_wheels() {
  exclude /.whl/
  venv
  mkdir -p .whl
  "$VENV/bin/pip" wheel -q --no-deps fairseq-fixed==0.12.3.1 -w .whl
  "$VENV/bin/pip" download -q --only-binary=:all: --no-deps -d .whl \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --python-version 3.12 --implementation cp --abi cp312 \
    hydra-core==1.3.2 omegaconf==2.3.0 bitarray
  "$VENV/bin/pip" wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
  du -sh .whl
}

step_carry() {
  exclude /.carry/
  mkdir -p .carry/shared/models .carry/shared/data .carry/pyinclude
  cp -r ../shared/models/multi30k_en_de .carry/shared/models/
  cp -r ../shared/data/multi30k .carry/shared/data/
  local inc
  inc=$("$PY312" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  cp -r "$inc" .carry/pyinclude/python3.12
  chmod -R u+w .carry
  du -sh .carry
}

tree_copy() { # the files the device tool sends: tracked ones, as they are now
  rm -rf "$1" && mkdir -p "$1"
  git ls-files -z | xargs -0 cp --parents -t "$1"
}

step_prebuilt() {
  exclude /.carry/
  venv
  tree_copy "$WORK/tree"
  (cd "$WORK/tree" && FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$VENV/bin/python" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1) ||
    { tail -30 "$WORK/build.log"; echo "gpu_prepare: build failed ($WORK/build.log)"; exit 1; }
  mkdir -p .carry/prebuilt
  rm -f .carry/prebuilt/_C*.so
  local so
  so=$(ls "$WORK"/tree/seqfuse/_C*.so)
  cp "$so" .carry/prebuilt/
  strip --strip-debug .carry/prebuilt/_C*.so
  # The sources it was built from: a later change to csrc/ or setup.py makes
  # gpu_check.sh build instead.
  (cd "$WORK/tree" && bash scripts/extension_sources_hash.sh) >.carry/prebuilt/SOURCES.sha256
  (cd "$WORK/tree" && "$VENV/bin/python" -c 'from seqfuse import _ext; print("built:", _ext.build_info())')
  ls -la .carry/prebuilt/
}

step_dry() {
  venv
  "$VENV/bin/pip" install -q "transformers==$DRY_TRANSFORMERS" sacrebleu sentencepiece pytest \
    pytest-timeout scipy psutil scikit-learn matplotlib
  tree_copy "$WORK/dry"
  cp -r .whl .carry "$WORK/dry/"
  cp .carry/prebuilt/_C*.so "$WORK/dry/seqfuse/"
  (cd "$WORK/dry" && PYTHON=$VENV/bin/python BUDGET=400 SEQFUSE_GIT_REV=dry bash scripts/gpu_check.sh \
    wheels info test bench >"$WORK/dry.log" 2>&1) || true
  grep -a "^===\|Error" "$WORK/dry.log" | grep -v "no CUDA device\|NVIDIA driver" || true
  (cd "$WORK/dry" && PYTHONPATH=/tmp/site "$VENV/bin/python" scripts/benchmark.py --device cpu \
    --models multi30k --providers fairseq,seqfuse,seqfuse-fused --batch-sizes 16 --sentences 32 \
    --repeats 1 --no-profile --no-memory --results-dir "$WORK/dryres" --name dry 2>&1 |
    grep -a "\[skip\]\|identical\|Error" || true)
  echo "gpu_prepare dry: full log in $WORK/dry.log"
}

for s in "${STEPS[@]}"; do
  case "$s" in
    wheels | carry | prebuilt | dry) "step_$s" ;;
    *) echo "unknown step: $s (wheels carry prebuilt dry)" && exit 2 ;;
  esac
done
