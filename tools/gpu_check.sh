#!/usr/bin/env bash
# The whole GPU check in one call, from the repository root of a GPU machine with no network:
# the tests that run the training steps, precision and sampling on the device, then
# tools/bench.py (JAX against PyTorch eager and torch.compile on the same GPU) for the tiny
# and reference configs in fp32 and bf16, plus a bf16 flow step at width 512 and batch 32
# (the MFU target's row). Each part runs under its own time limit, inside an overall one
# (460 s by default, the parts' limits add up to more: the last parts get what is left),
# and a failed or stopped part is recorded and the next one runs.
#
#   bash tools/gpu_wheels.sh       # first, on a machine with network: the missing wheels
#   bash tools/gpu_check.sh        # on the GPU machine, with .whl/ carried along
#   bash tools/gpu_check.sh --cpu  # a dry run on the CPU: tiny config, 1 step, a few tests
#
# Options: --cpu, --out DIR (default $OUT, else ./gpu_check_out), --budget SECONDS.
# Writes to the output folder: results.json (every part's status, the tests' counts and
# every bench row), results.md (the same as tables) and gpu_check.log (everything printed).
# Wheels in .whl/ are installed (GPU mode only; they are built for the GPU machine's
# Python 3.12) into a temporary folder put first on PYTHONPATH; without .whl/ the
# installed packages are used. This package itself runs from the source tree.
set -uo pipefail  # no -e: a failed part is recorded and the next one still runs
cd "$(dirname "$0")/.."

MODE=gpu
OUT_DIR=${OUT:-./gpu_check_out}
BUDGET=
while (($#)); do
  case $1 in
    --cpu) MODE=cpu ;;
    --out) OUT_DIR=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "usage: $0 [--cpu] [--out DIR] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
[[ -n $BUDGET ]] || { [[ $MODE == gpu ]] && BUDGET=460 || BUDGET=300; }

PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
DEADLINE=$((SECONDS + BUDGET))

# part NAME LIMIT COMMAND...: runs COMMAND under `timeout`, given at most what is left of
# the overall budget, and records "name rc seconds limit" (rc 124: stopped at the limit;
# skipped: too little budget left) before rewriting the report.
part() {
  local name=$1 limit=$2 start rc
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    echo "=== $name: skipped, ${left}s of the budget left"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$WORK/parts.tsv"
    report
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=20 "$limit" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$WORK/parts.tsv"
  echo "=== $name: exit $rc after $((SECONDS - start))s"
  report
}

report() {
  "$PY" tools/gpu_check_report.py "$WORK" "$OUT_DIR" "$MODE" || echo "report failed"
}

bench() {  # bench NAME LIMIT BENCH-ARGS...: one tools/bench.py run, its rows in NAME.json
  local name=$1 limit=$2
  shift 2
  part "$name" "$limit" "$PY" tools/bench.py --json "$WORK/$name.json" "$@"
}

setup() {
  if [[ $MODE == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl || echo "wheel install failed; going on without"
    export PYTHONPATH=$WORK/site:$PWD
  else
    echo "no wheels installed: using the installed packages"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  if [[ $MODE == gpu ]]; then
    export JAX_PLATFORMS=cuda  # fail rather than fall back to the CPU
    nvidia-smi || true
  else
    export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  fi
}

gpu_parts() {
  # One GPU: test_parallel's 8-device tests need 8 devices, so they are not run here.
  # Test workers share the GPU, so none may take 75% of its memory up front.
  part tests 80 env XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_FLAGS= \
    "$PY" -m pytest -q -n 3 -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    tests/test_train_step.py tests/test_precision.py tests/test_sampling.py
  # Most telling first (bf16, reference size, the MFU row), as the overall budget cuts the
  # last parts if compiling takes longer than planned. One stage per part, so a slow
  # compile costs only its own rows.
  local common=(--steps 20 --warmup 2 --compile-timeout 50)
  bench reference-bf16-flow 75 --configs reference --stages flow --precision bf16 "${common[@]}"
  bench flow512-bf16-flow-batch32 75 --configs flow512 --stages flow --precision bf16 \
    --batch-size 32 "${common[@]}"
  bench reference-bf16-vae_gan 95 --configs reference --stages vae_gan --precision bf16 \
    "${common[@]}"
  bench reference-fp32-flow 70 --configs reference --stages flow --precision fp32 "${common[@]}"
  bench reference-fp32-vae_gan 95 --configs reference --stages vae_gan --precision fp32 \
    "${common[@]}"
  bench tiny-bf16 60 --configs tiny --precision bf16 "${common[@]}"
  bench tiny-fp32 60 --configs tiny --precision fp32 "${common[@]}"
}

cpu_parts() {
  part tests 90 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    tests/test_sampling.py::test_to_uint8_rounds_to_nearest \
    tests/test_precision.py::test_unknown_precision_is_a_stage_error
  bench tiny-fp32 200 --configs tiny --stages flow --variants jax,torch --steps 1 --warmup 1
}

main() {
  echo "gpu_check ($MODE), $(date -u), budget ${BUDGET}s, output in $OUT_DIR"
  setup
  part environment 60 "$PY" -c "import jax, torch; print('jax', jax.__version__, \
jax.devices()); print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  "${MODE}_parts"
  echo "gpu_check done in ${SECONDS}s; results in $OUT_DIR"
  cat "$OUT_DIR/results.md"
  awk -F'\t' '$2 != 0 { failed = 1 } END { exit failed }' "$WORK/parts.tsv"
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
