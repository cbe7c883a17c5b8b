#!/usr/bin/env bash
# One-shot check of seqfuse on a machine with a GPU (see docs/GPU.md):
#   wheels  install the carried wheels from .whl/ (fairseq & co.) into /tmp/site
#   build   build seqfuse._C with CUDA in place
#   prebuilt  use .carry/prebuilt/_C*.so (built elsewhere against the same torch,
#           see docs/GPU.md) when it loads and sees the GPU, else build
#   info    python -m seqfuse.info
#   test    GPU tests (pytest -m gpu) and the CUDA cases of the op tests
#   bench   the candidate kernel's benchmark, BLEU in fp32/fp16/bf16,
#           scripts/benchmark.py (stock vs seqfuse generation), HF generate
# Usage: bash scripts/gpu_check.sh [step ...]     (default: every step, in order)
# Results go to benchmarks/results/*<stamp>* (and, when $OUT is set, the log and
# one archive of them go there, so the device tool brings them back). Environment: PYTHON (python3),
# TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (nproc), SEQFUSE_GIT_REV (the revision
# when the tree has no .git), STEP_TIMEOUT (seconds per step, 540), BUDGET
# (seconds for the whole check, 540: a step gets at most what is left, and
# steps are skipped once under 20 s are left), BENCH_ARGS (arguments of
# scripts/benchmark.py). The Multi30k model and data are read from ../shared;
# when that is missing and .carry/shared exists (a copy that travelled with the
# tree), ../shared is linked to it. A failed build stops the check.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=(wheels build info test bench)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=benchmarks/results
mkdir -p "$RES"
TXT="$RES/gpu_check_$STAMP.txt"
JSON="$RES/gpu_check_$STAMP.json"
STATUS=$(mktemp)
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
BUDGET=${BUDGET:-540}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export SEQFUSE_QUIET=1

if [ -n "${OUT:-}" ]; then
  exec > >(tee "$TXT" "$OUT/gpu_check_$STAMP.log") 2>&1
else
  exec > >(tee "$TXT") 2>&1
fi
if [ ! -e ../shared ] && [ -d .carry/shared ]; then
  ln -s "$PWD/.carry/shared" ../shared && echo "../shared -> .carry/shared"
fi

# run NAME CMD...: runs one step with a time limit (its own, or what is left of
# the budget), records its exit code and duration; returns the exit code.
run() {
  local name=$1
  shift
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, $left s left of the budget"
    echo "$name skipped 0" >>"$STATUS"
    return 0
  fi
  local limit=$((left < STEP_TIMEOUT ? left : STEP_TIMEOUT))
  echo "=== $name (limit ${limit} s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0))" >>"$STATUS"
  return $rc
}

step_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    # --no-deps: the wheels are chosen to complete what the machine has
    # (fairseq's torchaudio/scikit-learn requirements are not needed to generate).
    run wheels "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  else
    echo "=== wheels: no .whl/ directory; fairseq-based tests and benchmarks will skip"
  fi
}

step_build() {
  command -v nvcc >/dev/null && nvcc --version | tail -1
  # Python's headers, when the interpreter came without them (a carried copy
  # of the same minor version: .carry/pyinclude/python3.X).
  local inc
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  if [ ! -f "$inc/Python.h" ]; then
    local ver
    ver=$("$PY" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
    if [ -f ".carry/pyinclude/$ver/Python.h" ]; then
      export CPATH="$PWD/.carry/pyinclude/$ver${CPATH:+:$CPATH}"
      echo "Python.h missing in $inc: using .carry/pyinclude/$ver"
    else
      echo "Python.h missing in $inc (carry .carry/pyinclude/$ver to build)"
    fi
  fi
  export FORCE_CUDA=1
  run build "$PY" setup.py build_ext --inplace || {
    echo "=== build failed: the remaining steps are skipped"
    STEPS=()
  }
}

step_prebuilt() {
  local so
  so=$(compgen -G ".carry/prebuilt/_C*.so" | head -1)
  if [ -z "$so" ]; then
    echo "=== prebuilt: no .carry/prebuilt/_C*.so: building"
  elif [ "$(cat .carry/prebuilt/SOURCES.sha256 2>/dev/null)" != "$(bash scripts/extension_sources_hash.sh)" ]; then
    echo "=== prebuilt $so was built from other sources than these: building"
  else
    cp "$so" seqfuse/
    echo "=== prebuilt: $so"
    if timeout 120 "$PY" -c "from seqfuse import _ext; ok, why = _ext.cuda_available(); \
print('prebuilt extension:', _ext.build_info(), '-', why); raise SystemExit(0 if ok else 1)"; then
      echo "prebuilt 0 0" >>"$STATUS"
      return 0
    fi
    echo "=== prebuilt $so does not load or see the GPU: building"
    rm -f "seqfuse/$(basename "$so")"
  fi
  step_build
}

step_info() { run info "$PY" -m seqfuse.info; }

step_test() {
  run test_gpu "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests
  run test_ops_cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_layer_ops.py -k cuda
}

step_bench() {
  local bench_args=${BENCH_ARGS:---models multi30k,base --providers fairseq,seqfuse \
    --batch-sizes 16,64,128 --beams 5 --sentences 256 --base-sentences 128 --repeats 2 \
    --gpu-dtypes fp32,fp16 --no-profile}
  STEP_TIMEOUT=60 run bench_beam_topk "$PY" benchmarks/bench_beam_topk.py --device cuda \
    --json "$RES/bench_beam_topk_cuda_$STAMP.json"
  STEP_TIMEOUT=120 run bleu_dtypes "$PY" scripts/bleu_dtypes.py --device cuda \
    --out "$RES/bleu_dtypes_cuda_$STAMP.json"
  # shellcheck disable=SC2086
  STEP_TIMEOUT=240 run benchmark "$PY" scripts/benchmark.py --device cuda --results-dir "$RES" \
    --name "gpu_check_bench_$STAMP" $bench_args
  for dt in float32 float16; do
    STEP_TIMEOUT=90 run "bench_hf_$dt" "$PY" benchmarks/bench_hf.py --device cuda --dtype "$dt" \
      --batch 1,16,64 --out "$RES/bench_hf_cuda_${dt}_$STAMP.json"
  done
}

echo "seqfuse gpu_check $STAMP steps: ${STEPS[*]}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
for s in "${STEPS[@]}"; do
  case "$s" in
    wheels | build | prebuilt | info | test | bench) ;;
    *) echo "unknown step: $s (wheels build prebuilt info test bench)" && exit 2 ;;
  esac
done
i=0
while [ $i -lt ${#STEPS[@]} ]; do
  "step_${STEPS[$i]}"
  i=$((i + 1))
done

REV=${SEQFUSE_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
"$PY" - "$STATUS" "$JSON" "$STAMP" "$REV" <<'EOF'
import json, platform, subprocess, sys

status_file, out, stamp, rev = sys.argv[1:5]
steps = []
for line in open(status_file):
    name, rc, secs = line.split()
    rc = None if rc == "skipped" else int(rc)
    steps.append({"step": name, "rc": rc, "skipped": rc is None, "seconds": int(secs)})


def version(mod):
    try:
        return getattr(__import__(mod), "__version__", "?")
    except Exception as e:
        return f"not available ({type(e).__name__})"


ctx = {"date": stamp, "git_revision": rev, "python": platform.python_version()}
for mod in ("torch", "transformers", "fairseq", "sacrebleu"):
    ctx[mod] = version(mod)
try:
    import torch

    ctx["torch_cuda"] = torch.version.cuda
    ctx["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    from seqfuse import _ext

    ctx["extension_build"] = _ext.build_info()
except Exception as e:
    ctx["error"] = f"{type(e).__name__}: {e}"
try:
    ctx["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception:
    ctx["nvcc"] = "not found"
json.dump({"context": ctx, "steps": steps}, open(out, "w"), indent=1)
print(json.dumps(ctx, indent=1))
bad = [s["step"] for s in steps if s["rc"] not in (0, None)]
print("gpu_check:", "FAILED steps: " + ", ".join(bad) if bad else "all steps passed")
sys.exit(1 if bad else 0)
EOF
RC=$?
rm -f "$STATUS"
if [ -n "${OUT:-}" ]; then
  # One archive: the device tool brings back at most 8 files.
  (cd "$RES" && tar czf "$OUT/gpu_check_$STAMP.tar.gz" ./*"$STAMP"*)
  sleep 1 # let tee write the log's last lines
fi
exit $RC
