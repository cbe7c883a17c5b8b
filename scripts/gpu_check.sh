#!/usr/bin/env bash
# One-shot check of seqfuse on a machine with a GPU (see docs/GPU.md):
#   wheels  install the carried wheels from .whl/ (fairseq & co.) into /tmp/site
#   build   build seqfuse._C with CUDA in place
#   info    python -m seqfuse.info
#   test    GPU tests (pytest -m gpu) and the op tests
#   bench   the kernel benchmark, HF generate (fp32, fp16), then scripts/benchmark.py
# Usage: bash scripts/gpu_check.sh [step ...]     (default: every step, in order)
# Results go to benchmarks/results/gpu_check_<stamp>.{txt,json} (and to $OUT when
# set, so the device tool brings them back). Environment: PYTHON (python3),
# TORCH_CUDA_ARCH_LIST (9.0), MAX_JOBS (nproc), SEQFUSE_GIT_REV (the revision
# when the tree has no .git), STEP_TIMEOUT (seconds per step, 540),
# BENCH_ARGS (extra arguments of scripts/benchmark.py).
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
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export SEQFUSE_QUIET=1

exec > >(tee "$TXT") 2>&1

# run NAME CMD...: runs one step with a time limit, records its exit code and duration.
run() {
  local name=$1
  shift
  echo "=== $name: $*"
  local t0=$SECONDS
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  echo "$name $rc $((SECONDS - t0))" >>"$STATUS"
  return 0
}

step_wheels() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    # --no-deps: the wheels are chosen to complete what the machine has
    # (fairseq's torchaudio/scikit-learn requirements are not needed to generate).
    run wheels "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site .whl/*.whl
  else
    echo "=== wheels: no .whl/ directory; fairseq-based tests and benchmarks will skip"
  fi
}

step_build() {
  command -v nvcc >/dev/null && nvcc --version | tail -1
  export FORCE_CUDA=1
  run build "$PY" setup.py build_ext --inplace
}

step_info() { run info "$PY" -m seqfuse.info; }

step_test() {
  run test_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu tests
  local ops=()
  for f in tests/test_beam_topk.py tests/test_layer_ops.py; do [ -f "$f" ] && ops+=("$f"); done
  run test_ops "$PY" -m pytest -q -p no:cacheprovider "${ops[@]}"
  [ -f tests/test_hf.py ] && run test_hf "$PY" -m pytest -q -p no:cacheprovider tests/test_hf.py
}

step_bench() {
  run bench_beam_topk "$PY" benchmarks/bench_beam_topk.py --json "$RES/bench_beam_topk_$STAMP.json"
  run bleu_dtypes "$PY" scripts/bleu_dtypes.py --device cuda --out "$RES/bleu_dtypes_cuda_$STAMP.json"
  for dt in float32 float16; do
    run "bench_hf_$dt" "$PY" benchmarks/bench_hf.py --device cuda --dtype "$dt" --batch 1,16,64 \
      --out "$RES/bench_hf_cuda_${dt}_$STAMP.json"
  done
  if [ -f scripts/benchmark.py ]; then
    # shellcheck disable=SC2086
    run benchmark "$PY" scripts/benchmark.py --device cuda --results-dir "$RES" \
      --name "gpu_check_bench_$STAMP" ${BENCH_ARGS:-}
  fi
}

echo "seqfuse gpu_check $STAMP steps: ${STEPS[*]}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
for s in "${STEPS[@]}"; do
  case "$s" in
    wheels | build | info | test | bench) "step_$s" ;;
    *) echo "unknown step: $s (wheels build info test bench)" && exit 2 ;;
  esac
done

REV=${SEQFUSE_GIT_REV:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
"$PY" - "$STATUS" "$JSON" "$STAMP" "$REV" <<'EOF'
import json, platform, subprocess, sys

status_file, out, stamp, rev = sys.argv[1:5]
steps = []
for line in open(status_file):
    name, rc, secs = line.split()
    steps.append({"step": name, "rc": int(rc), "seconds": int(secs)})


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
bad = [s["step"] for s in steps if s["rc"] != 0]
print("gpu_check:", "FAILED steps: " + ", ".join(bad) if bad else "all steps passed")
sys.exit(1 if bad else 0)
EOF
RC=$?
rm -f "$STATUS"
if [ -n "${OUT:-}" ]; then
  sleep 1 # let tee write the log's last lines
  mkdir -p "$OUT/results"
  cp -r "$RES"/*"$STAMP"* "$OUT/results/" 2>/dev/null || true
fi
exit $RC
