#!/usr/bin/env bash
# make gpu-check: the whole GPU path on a box with an NVIDIA GPU (or a Jetson), in one run.
#
# In a fresh venv it installs the toolkit with the GPU extras, trains a 1-epoch chollet_mnist,
# exports ONNX FP32/FP16/INT8, builds TensorRT engines on this device (torch-free builder),
# runs `verify` and `bench` for every usable backend x precision and `pytest -m gpu`, then prints
# one table: step, status (ok / FAIL / skipped: reason), seconds, key figure. Every step has a
# timeout and its own log under $GPU_CHECK_DIR/logs. A failing step is recorded and the run goes
# on where that makes sense; the exit status is 1 if any step failed (skips are not failures).
# Without a GPU the GPU steps are reported as skipped and the script still exits 0.
#
# Settings (environment):
#   GPU_CHECK_DIR        work folder: venv/, run/, bundle/, logs/            (default .gpu-check)
#   GPU_CHECK_VENV       reuse this venv instead of building a fresh one (nothing is installed)
#   GPU_CHECK_PYTHON     interpreter that makes the fresh venv                (default python3)
#   GPU_CHECK_VENV_ARGS  extra `python -m venv` flags, e.g. --system-site-packages on a Jetson
#                        (system TensorRT from JetPack)
#   GPU_CHECK_TORCH      torch requirement(s) and pip flags (default "torch==2.14.1 torchvision==0.29.1", a CUDA 13
#                        build). A driver older than 580 (CUDA 12): GPU_CHECK_EXTRAS=tensorrt-cu12 and
#                        GPU_CHECK_TORCH="torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu126"
#   GPU_CHECK_EXTRAS     edgeconv-runtime extras, comma list (default tensorrt-cu13: TensorRT + cuda-python 13 from
#                        pip, the CUDA major of the pinned torch; "" on a Jetson, which uses JetPack's TensorRT)
#   GPU_CHECK_ORT_INSTALL  the command that swaps the CPU onnxruntime for the GPU build (default: the one the
#                        runtime documents, `edgeconv_runtime.ortbuild.gpu_install_command()`; "none" skips it)
#   GPU_CHECK_PIP_ARGS   extra pip flags for the other installs
#   GPU_CHECK_PRECISIONS default fp32,fp16,int8
#   GPU_CHECK_TEST_DATA  MNIST IDX folder for the test split (default $EDGECONV_DATA/mnist, else ../shared/data/mnist, if present)
#   GPU_CHECK_BENCH_SECONDS  seconds per bench measurement (default 2)
#   GPU_CHECK_TIMEOUT_{INSTALL,TRAIN,EXPORT,BUILD,VERIFY,BENCH,PYTEST}  per-step limits in seconds
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
SUMMARY_PY="$ROOT/scripts/gpu_check_summary.py"

WORK=${GPU_CHECK_DIR:-.gpu-check}
mkdir -p "$WORK" || exit 2
WORK=$(cd "$WORK" && pwd)
LOGS="$WORK/logs"
RUN_DIR="$WORK/run"
BUNDLE="$WORK/bundle"
VENV=${GPU_CHECK_VENV:-$WORK/venv}
PYTHON_FOR_VENV=${GPU_CHECK_PYTHON:-python3}
VENV_ARGS=${GPU_CHECK_VENV_ARGS:-}
TORCH_SPEC=${GPU_CHECK_TORCH:-torch==2.14.1 torchvision==0.29.1}
# tensorrt-cu13 by default: torch 2.14.1 is a CUDA 13 build that requires cuda-bindings>=13, so the cu12 extra's
# cuda-python<13 makes pip replace the pinned torch with an older one (checked with `pip install --dry-run`).
# torch's CUDA 13 already needs a driver >= 580, which also runs the CUDA 12 onnxruntime-gpu wheels.
EXTRAS=${GPU_CHECK_EXTRAS-tensorrt-cu13}
PIP_ARGS=${GPU_CHECK_PIP_ARGS:-}
PRECISIONS=${GPU_CHECK_PRECISIONS:-fp32,fp16,int8}
TEST_DATA=${GPU_CHECK_TEST_DATA:-${EDGECONV_DATA:-$ROOT/../shared/data}/mnist}
BENCH_SECONDS=${GPU_CHECK_BENCH_SECONDS:-2}
T_INSTALL=${GPU_CHECK_TIMEOUT_INSTALL:-1800}
T_TRAIN=${GPU_CHECK_TIMEOUT_TRAIN:-900}
T_EXPORT=${GPU_CHECK_TIMEOUT_EXPORT:-900}
T_BUILD=${GPU_CHECK_TIMEOUT_BUILD:-1800}
T_VERIFY=${GPU_CHECK_TIMEOUT_VERIFY:-300}
T_BENCH=${GPU_CHECK_TIMEOUT_BENCH:-600}
T_PYTEST=${GPU_CHECK_TIMEOUT_PYTEST:-3600}
T_SHORT=120

export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="$VENV/bin/python"
RT="$VENV/bin/edgeconv-runtime"
EC="$VENV/bin/edgeconv"

rm -rf "$LOGS" "$RUN_DIR" "$BUNDLE"
mkdir -p "$LOGS"

# ------------------------------------------------------------------ step records
NAMES=(); STATUS=(); SECS=(); KEYS=()
N=0
LAST_LOG=""

now_ns() { date +%s%N; }

record() {  # name status seconds key
    NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); KEYS+=("$4")
    printf '[%2d] %-34s %6s s  %s  %s\n' "${#NAMES[@]}" "$1" "$3" "$2" "$4" >&2
}

skip() {  # name reason
    record "$1" "skipped: $2" "-" ""
}

# run_step NAME TIMEOUT [--stdout FILE] CMD...: runs CMD under `timeout`, its output in logs/NN-NAME.log
# (with --stdout, stdout goes to FILE and stderr to the log). Records ok / FAIL; returns CMD's status.
run_step() {
    local name=$1 limit=$2 out="" rc start secs status slug
    shift 2
    if [ "${1:-}" = "--stdout" ]; then out=$2; shift 2; fi
    N=$((N + 1))
    slug=$(printf '%s' "$name" | tr -c 'A-Za-z0-9.,_-' '-')
    LAST_LOG=$(printf '%s/%02d-%s.log' "$LOGS" "$N" "$slug")
    printf '$ %s\n' "$*" >"$LAST_LOG"
    start=$(now_ns)
    if [ -n "$out" ]; then
        timeout -k 30 "$limit" "$@" >"$out" 2>>"$LAST_LOG"
    else
        timeout -k 30 "$limit" "$@" >>"$LAST_LOG" 2>&1
    fi
    rc=$?
    secs=$(awk -v a="$start" -v b="$(now_ns)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    case $rc in
        0) status="ok" ;;
        124|137) status="FAIL: timed out after ${limit} s" ;;
        *) status="FAIL: exit $rc" ;;
    esac
    PENDING_NAME=$name; PENDING_STATUS=$status; PENDING_SECS=$secs
    return $rc
}

# finish_step [KEY] [STATUS]: records the step run_step just ran, with its key figure (and a status override)
finish_step() {
    record "$PENDING_NAME" "${2:-$PENDING_STATUS}" "$PENDING_SECS" "${1:-}"
}

key() {  # kind path: one key figure from scripts/gpu_check_summary.py ("-" when unreadable)
    local py=$PY
    [ -x "$py" ] || py=python3
    "$py" "$SUMMARY_PY" "$@" 2>/dev/null || true
}

print_table() {
    local i w1=4 w2=6 line
    for i in "${!NAMES[@]}"; do
        (( ${#NAMES[$i]} > w1 )) && w1=${#NAMES[$i]}
        (( ${#STATUS[$i]} > w2 )) && w2=${#STATUS[$i]}
    done
    (( w2 > 64 )) && w2=64
    {
        echo
        echo "gpu-check summary ($(date '+%Y-%m-%d %H:%M'), logs in $LOGS)"
        printf "%-${w1}s  %-${w2}s  %8s  %s\n" "step" "status" "seconds" "key figure"
        line=$(printf '%*s' $((w1 + w2 + 30)) '' | tr ' ' '-')
        echo "$line"
        for i in "${!NAMES[@]}"; do
            printf "%-${w1}s  %-${w2}s  %8s  %s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${KEYS[$i]}"
        done
    } | tee "$LOGS/summary.txt"
}

finish() {
    local i failed=0
    print_table
    for i in "${!STATUS[@]}"; do
        case ${STATUS[$i]} in FAIL*) failed=$((failed + 1)) ;; esac
    done
    if [ $failed -gt 0 ]; then
        echo "gpu-check: $failed step(s) FAILED; see their logs in $LOGS"
        exit 1
    fi
    echo "gpu-check: no step failed"
    exit 0
}

trap 'echo "gpu-check: interrupted" >&2; print_table; exit 130' INT TERM

has_extra() {  # prefix: does the comma list $EXTRAS hold an extra starting with PREFIX (tensorrt, tensorrt-cu12, ...)?
    case ",$EXTRAS," in *",$1"*) return 0 ;; esac
    return 1
}

last_line() {  # file: its last "error" line (ours print `error: ...`, pip's `ERROR: ...`), else its last line, cut to fit
    local line
    line=$(grep -E '^(error|ERROR|Error)[: ]' "$1" 2>/dev/null | tail -n 1)
    [ -n "$line" ] || line=$(grep -v -e '^[[:space:]]*$' -e '^\$ ' "$1" 2>/dev/null | tail -n 1)
    printf '%s\n' "$line" | cut -c1-160
}

pip_error() {  # pip log: the package it failed on, else its last error line
    local pkg
    pkg=$(grep -A1 'Encountered error' "$1" 2>/dev/null | sed -n 's/.*─> *//p' | tail -n 1)
    if [ -n "$pkg" ]; then printf '%s\n' "pip could not build $pkg ($(grep -m1 -o 'pip install --extra-index-url [^ ]*' "$1" || echo 'see its log'))"
    else last_line "$1"; fi
}

# ------------------------------------------------------------------ 1. environment
INSTALLED_HERE=0
ORT_GPU_HERE=0
if [ -n "${GPU_CHECK_VENV:-}" ]; then
    if [ -x "$PY" ]; then
        record "venv" "ok" "-" "reusing $VENV (GPU_CHECK_VENV)"
        skip "install toolkit" "reusing GPU_CHECK_VENV"
    else
        record "venv" "FAIL: $VENV/bin/python not found" "-" ""
        finish
    fi
else
    # shellcheck disable=SC2086  # VENV_ARGS, PIP_ARGS and TORCH_SPEC are word lists on purpose
    run_step "venv" "$T_SHORT" "$PYTHON_FOR_VENV" -m venv --clear $VENV_ARGS "$VENV"
    finish_step "$("$PYTHON_FOR_VENV" --version 2>&1) at $VENV"
    [ -x "$PY" ] || finish
    # shellcheck disable=SC2086
    run_step "install pip" "$T_INSTALL" "$PY" -m pip install $PIP_ARGS --upgrade pip
    finish_step
    # shellcheck disable=SC2086
    run_step "install $TORCH_SPEC" "$T_INSTALL" "$PY" -m pip install $PIP_ARGS $TORCH_SPEC || { finish_step; finish; }
    finish_step
    RUNTIME_REQ="./runtime"
    [ -n "$EXTRAS" ] && RUNTIME_REQ="./runtime[$EXTRAS]"
    # shellcheck disable=SC2086
    run_step "install $RUNTIME_REQ export .[dev]" "$T_INSTALL" \
        "$PY" -m pip install $PIP_ARGS -e "$RUNTIME_REQ" -e ./export -e ".[dev]" || { finish_step "$(pip_error "$LAST_LOG")"; finish; }
    finish_step
    INSTALLED_HERE=1
    # onnxruntime: the toolkit depends on the CPU build; the GPU build replaces it, by the command the runtime documents
    # (README "Install on your device"; on a Jetson it names JetPack's wheel index)
    ORT_INSTALL=${GPU_CHECK_ORT_INSTALL:-$("$PY" -c 'from edgeconv_runtime.ortbuild import gpu_install_command; print(gpu_install_command())' 2>/dev/null)}
    if [ -z "$ORT_INSTALL" ]; then
        record "install onnxruntime GPU build" "FAIL: the runtime names no GPU install command; set GPU_CHECK_ORT_INSTALL" "-" ""
    elif [ "$ORT_INSTALL" = none ]; then
        skip "install onnxruntime GPU build" "GPU_CHECK_ORT_INSTALL=none"
    else
        run_step "install onnxruntime GPU build" "$T_INSTALL" env PATH="$VENV/bin:$PATH" bash -c "$ORT_INSTALL"
        finish_step "$ORT_INSTALL"
        ORT_GPU_HERE=1
    fi
    record "installed" "ok" "-" "$(key versions)"
fi

# what GPU CUDA sees (the runtime's own view, the one the backends use)
HAVE_GPU=0
run_step "gpu" "$T_SHORT" --stdout "$LOGS/gpu.json" "$PY" -c \
    'import json; from edgeconv_runtime.gpu import gpu_info; print(json.dumps(gpu_info()))'
GPU_KEY=$(key gpu "$LOGS/gpu.json")
finish_step "$GPU_KEY"
case $GPU_KEY in "no NVIDIA GPU found"|-*|"") ;; *) HAVE_GPU=1 ;; esac
NO_GPU="no NVIDIA GPU found"

# onnxruntime's build: one build only, and after the GPU install CUDAExecutionProvider is listed (even without a GPU)
run_step "onnxruntime build" "$T_SHORT" --stdout "$LOGS/onnxruntime.txt" "$PY" -c '
import onnxruntime as o
try:
    from edgeconv_runtime.ortbuild import mixed_install_problem, module_build
    build, problem = module_build(), mixed_install_problem()
except ImportError:
    build, problem = None, None
print((build or "onnxruntime"), o.__version__, ",".join(p.replace("ExecutionProvider", "") for p in o.get_available_providers()))
if problem:
    print("MIXED", problem)
'
ORT_LINE=$(head -n 1 "$LOGS/onnxruntime.txt" 2>/dev/null)
ORT_MIXED=$(sed -n 's/^MIXED //p' "$LOGS/onnxruntime.txt" 2>/dev/null)
if [ -n "$ORT_MIXED" ]; then
    finish_step "$ORT_LINE" "FAIL: $ORT_MIXED"
else
    case $ORT_LINE in
        *CUDA*) finish_step "$ORT_LINE" ;;
        *)  if [ $HAVE_GPU = 1 ] || [ $ORT_GPU_HERE = 1 ]; then
                finish_step "$ORT_LINE" "FAIL: this onnxruntime has no CUDAExecutionProvider"
            else
                finish_step "$ORT_LINE"
            fi ;;
    esac
fi

run_step "backends" "$T_SHORT" "$RT" backends
"$PY" -c 'import json; from edgeconv_runtime.backends import available_backends; print(json.dumps(available_backends()))' \
    >"$LOGS/backends.json" 2>>"$LAST_LOG"
USABLE=" $(key usable "$LOGS/backends.json" | tr '\n' ' ') "  # space-separated, padded for matching
why_not() {  # backend: the runtime's reason it is unusable here
    "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]][1])' "$LOGS/backends.json" "$1" 2>/dev/null || echo "unknown"
}
BACKENDS_STATUS=""
if [ $HAVE_GPU = 1 ]; then
    case $USABLE in
        *" onnxruntime-cuda "*) ;;
        *) BACKENDS_STATUS="FAIL: GPU present but onnxruntime-cuda unusable: $(why_not onnxruntime-cuda)" ;;
    esac
    if [ -z "$BACKENDS_STATUS" ] && [ $INSTALLED_HERE = 1 ] && has_extra tensorrt; then
        case $USABLE in
            *" tensorrt "*) ;;
            *) BACKENDS_STATUS="FAIL: tensorrt extra installed but backend unusable: $(why_not tensorrt)" ;;
        esac
    fi
fi
finish_step "$(key backends "$LOGS/backends.json")" "$BACKENDS_STATUS"

# ------------------------------------------------------------------ 2. train and export
TRAIN_ARGS=(train --data mnist-5k --model chollet_mnist --epochs 1 --out "$RUN_DIR")
[ -d "$TEST_DATA" ] && TRAIN_ARGS+=(--test-data "$TEST_DATA")
HAVE_BUNDLE=0
if run_step "train chollet_mnist 1 epoch" "$T_TRAIN" "$EC" "${TRAIN_ARGS[@]}"; then
    finish_step "$(key train "$RUN_DIR")"
    if run_step "export onnx $PRECISIONS" "$T_EXPORT" "$EC" export "$RUN_DIR" --out "$BUNDLE" --precision "$PRECISIONS"; then
        finish_step "$(key export "$BUNDLE")"
        HAVE_BUNDLE=1
    else
        finish_step "$(last_line "$LAST_LOG")"
    fi
else
    finish_step "$(last_line "$LAST_LOG")"
    skip "export onnx $PRECISIONS" "training failed"
fi

# ------------------------------------------------------------------ 3. TensorRT engines, built here
ENGINES_BUILT=0
if [ $HAVE_BUNDLE = 0 ]; then
    skip "build-engine $PRECISIONS" "no bundle (training or export failed)"
elif [ $HAVE_GPU = 0 ]; then
    skip "build-engine $PRECISIONS" "$NO_GPU"
elif ! "$PY" -c 'import tensorrt' >/dev/null 2>&1 && ! { [ $INSTALLED_HERE = 1 ] && has_extra tensorrt; }; then
    # not asked for: a skip. Installed here with a tensorrt extra and still not importable: build-engine runs and says why
    skip "build-engine $PRECISIONS" "tensorrt is not importable in $VENV"
else
    if run_step "build-engine $PRECISIONS" "$T_BUILD" "$RT" build-engine "$BUNDLE" --precision "$PRECISIONS"; then
        finish_step "$(key engines "$BUNDLE")"
        ENGINES_BUILT=1
    else
        finish_step "$(last_line "$LAST_LOG")"
    fi
fi

# ------------------------------------------------------------------ 4. verify and bench: usable backend x precision
# every registered backend, in the registry's order (unusable ones get one "skipped" row with the reason)
ALL_BACKENDS=$("$PY" -c 'import json, sys; print(" ".join(json.load(open(sys.argv[1]))))' "$LOGS/backends.json" 2>/dev/null)
# backend x precision pairs a backend does not run at all (e.g. openvino-cpu has no fp16): "backend precision<TAB>why"
# shellcheck disable=SC2086  # one argument per backend
"$PY" - "$PRECISIONS" $ALL_BACKENDS >"$LOGS/unsupported.tsv" 2>/dev/null <<'PYEOF'
import sys
try:
    from edgeconv_runtime.backends import precision_problem
except ImportError:  # a runtime without per-backend precisions: every pair is tried
    sys.exit(0)
for name in sys.argv[2:]:
    for precision in sys.argv[1].split(","):
        why = precision_problem(name, precision)
        if why:
            print(f"{name} {precision}\t{why}")
PYEOF
[ $HAVE_BUNDLE = 0 ] && { skip "verify+bench" "no bundle (training or export failed)"; ALL_BACKENDS=""; }
for backend in $ALL_BACKENDS; do
    case $USABLE in
        *" $backend "*) ;;
        *)  case $HAVE_GPU:$backend in
                0:*cuda*|0:*tensorrt*) skip "verify+bench $backend" "$NO_GPU" ;;
                *) skip "verify+bench $backend" "$(why_not "$backend")" ;;
            esac
            continue ;;
    esac
    for precision in $(echo "$PRECISIONS" | tr ',' ' '); do
        unsupported=$(grep -F "$backend $precision"$'\t' "$LOGS/unsupported.tsv" 2>/dev/null | cut -f2)
        if [ -n "$unsupported" ]; then
            skip "verify+bench $backend $precision" "$unsupported"
            continue
        fi
        if [ "$backend" = tensorrt ] && [ $ENGINES_BUILT = 0 ]; then
            skip "verify+bench $backend $precision" "no engine (build-engine did not succeed)"
            continue
        fi
        vjson="$LOGS/verify-$backend-$precision.json"
        run_step "verify $backend $precision" "$T_VERIFY" --stdout "$vjson" \
            "$RT" verify "$BUNDLE" --backend "$backend" --precision "$precision" --json
        vkey=$(key verify "$vjson")
        case $vkey in -*) vkey=$(last_line "$LAST_LOG") ;; esac  # no JSON: the one-line error says why
        finish_step "$vkey"
        bjson="$LOGS/bench-$backend-$precision.json"
        run_step "bench $backend $precision" "$T_BENCH" \
            "$RT" bench "$BUNDLE" --backend "$backend" --precision "$precision" --batch-sizes 1,32 \
            --duration "$BENCH_SECONDS" --json "$bjson"
        finish_step "$(key bench "$bjson")"
    done
done

# ------------------------------------------------------------------ 5. the GPU tests
# They skip where no GPU is found: running them anyway checks that they collect and skip cleanly.
run_step "pytest -m gpu" "$T_PYTEST" "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider \
    --junitxml "$LOGS/pytest-gpu.xml"
PYTEST_RC=$?
PYTEST_KEY=$(key pytest "$LOGS/pytest-gpu.xml")
if [ $PYTEST_RC = 0 ] && [ $HAVE_GPU = 0 ]; then
    finish_step "$PYTEST_KEY" "skipped: $NO_GPU"
else
    finish_step "$PYTEST_KEY"
fi

finish
