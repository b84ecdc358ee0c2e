#!/usr/bin/env bash
# The documented installs, each in a fresh venv on this machine (no GPU needed):
#   cpu    `pip install ./runtime`                      -> onnxruntime-cpu usable, no GPU build installed
#   gpu    the NVIDIA-GPU command from the README       -> only onnxruntime-gpu installed, CUDAExecutionProvider
#                                                          listed, `backends` says "no NVIDIA GPU found" (not
#                                                          "this onnxruntime build has no ...") for onnxruntime-cuda
#   mixed  the CPU wheel installed over the GPU one     -> `backends` names both and prints the fix; running that
#                                                          fix brings the CUDA provider back
#   half-fix  `pip uninstall onnxruntime` in that state -> `backends` says the module is gone and prints the
#                                                          repair; running it brings the CUDA provider back
#   toolkit  `pip install .` at the root (not editable) -> `edgeconv` and `edgeconv-runtime` run, the three packages
#                                                          import from site-packages with their py.typed
#   export   `pip install ./runtime ./export`            -> edgeconv_export imports
# With a BUNDLE argument each venv also runs `verify` on it with onnxruntime-cpu.
# Prints a pass/fail table; exits 1 if any check failed.
#
#   scripts/check_install.sh [BUNDLE]
#
# Settings (environment):
#   PYTHON               interpreter for the venvs                    (default python3.11, else python3)
#   INSTALL_CHECK_DIR    work folder: venvs and logs                  (default /tmp/edgeconv-install-check)
#   PIP_CACHE_DIR        pip's cache, kept between runs: onnxruntime-gpu with CUDA/cuDNN wheels is ~2 GB
#                        of downloads the first time                  (default ~/.cache/edgeconv-install-check)
#   INSTALL_CHECK_KEEP=1 keep the venvs afterwards (they take ~4 GB)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
BUNDLE=${1:-}
WORK=${INSTALL_CHECK_DIR:-/tmp/edgeconv-install-check}
LOGS="$WORK/logs"
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$HOME/.cache/edgeconv-install-check}
export PIP_DISABLE_PIP_VERSION_CHECK=1
mkdir -p "$LOGS" "$PIP_CACHE_DIR" || exit 2
rm -f "$LOGS"/*.log
if [ -z "${PYTHON:-}" ]; then
    PYTHON=$(command -v python3.11 >/dev/null && python3.11 -c '' 2>/dev/null && command -v python3.11 || command -v python3)
fi

# shellcheck source=scripts/_rows.sh
. "$ROOT/scripts/_rows.sh"
expect() {  # check detail condition...: record ok when the condition command succeeds
    local name=$1 detail=$2
    shift 2
    if "$@"; then record "$name" ok "$detail"; else record "$name" FAIL "$detail"; fi
}
table() {
    print_rows check 44 check_install "$("$PYTHON" --version 2>&1); logs: $LOGS"
}
fresh_venv() {  # dir: a new venv with nothing but pip
    rm -rf "$1" && "$PYTHON" -m venv "$1"
}
in_venv() {  # venv command-string: run as if the venv were activated (the README's commands say plain `pip`)
    PATH="$1/bin:$PATH" VIRTUAL_ENV="$1" bash -c "$2"
}
ort_dists() {  # venv: the onnxruntime distributions pip has installed, e.g. "onnxruntime-gpu 1.31.1"
    "$1/bin/python" - <<'EOF'
from edgeconv_runtime.ortbuild import installed_ort_dists
print(", ".join(f"{d} {v}" for d, v in installed_ort_dists().items()) or "none")
EOF
}
providers() {  # venv: onnxruntime.get_available_providers(), short names
    "$1/bin/python" -c 'import onnxruntime as o; print(",".join(p.replace("ExecutionProvider", "") for p in o.get_available_providers()))' 2>&1 | tail -n 1
}
backend_row() {  # venv name: the `backends` line for one backend, spaces squeezed
    "$1/bin/edgeconv-runtime" backends 2>&1 | grep "^$2 " | tr -s ' '
}
verify_bundle() {  # venv label
    [ -n "$BUNDLE" ] || return 0
    local out
    out=$("$1/bin/edgeconv-runtime" verify "$BUNDLE" --backend onnxruntime-cpu 2>&1)
    expect "$2: verify (onnxruntime-cpu)" "$(echo "$out" | tail -n 1 | cut -c1-90)" grep -q "verify OK" <<<"$out"
}
cuda_usable() {  # the onnxruntime-cuda row says what this machine should say, and CUDA is among the providers
    grep -q '\bCUDA\b' <<<"$PROV" && grep -q "$CUDA_WANT" <<<"$ROW"
}

# ---------------------------------------------------------------- cpu: pip install ./runtime
V="$WORK/venv-cpu"
if fresh_venv "$V" >"$LOGS/cpu_venv.log" 2>&1 && in_venv "$V" "pip install ./runtime" >"$LOGS/cpu_install.log" 2>&1; then
    record "cpu: pip install ./runtime" ok "$(ort_dists "$V")"
    ROW=$(backend_row "$V" onnxruntime-cpu)
    expect "cpu: backends onnxruntime-cpu" "$ROW" grep -q "^onnxruntime-cpu yes" <<<"$ROW"
    DISTS=$(ort_dists "$V")
    expect "cpu: one onnxruntime build" "$DISTS" grep -qx "onnxruntime [0-9.]*" <<<"$DISTS"
    verify_bundle "$V" cpu
    # the command the README documents for an NVIDIA GPU on x86 (the runtime's own fix line, so the two cannot drift)
    GPU_COMMAND="pip install ./runtime && $("$V/bin/python" -c \
        'from edgeconv_runtime.ortbuild import gpu_install_command; print(gpu_install_command(jetson=False))')"
    HAS_GPU=$("$V/bin/python" -c 'from edgeconv_runtime.gpu import gpu_info; print(gpu_info() is not None)')
else
    record "cpu: pip install ./runtime" FAIL "see $LOGS/cpu_install.log: $(tail -n 1 "$LOGS/cpu_install.log" | cut -c1-80)"
fi

# ---------------------------------------------------------------- toolkit: pip install . (from a clean copy)
clean_copy() {  # dest: the sources a fresh clone holds, without build/ or egg-info left by earlier builds
    rm -rf "$1" && mkdir -p "$1" &&
        git ls-files -z --cached --others --exclude-standard pyproject.toml README.md edgeconv runtime export |
        xargs -0 -I{} sh -c '[ -f "{}" ] && mkdir -p "$0/$(dirname "{}")" && cp "{}" "$0/{}" || true' "$1"
}
toolkit_imports() {  # venv: every package from site-packages, typed
    (cd "$WORK" && "$1/bin/python" - <<'EOF'
import importlib.resources as res, sysconfig
for package in ("edgeconv", "edgeconv_runtime", "edgeconv_export"):
    mod = __import__(package)
    assert mod.__file__.startswith(sysconfig.get_paths()["purelib"]) and res.files(package).joinpath("py.typed").is_file(), package
print("3 packages from site-packages, typed")
EOF
    )
}
V="$WORK/venv-toolkit"
if clean_copy "$WORK/src" && fresh_venv "$V" >"$LOGS/toolkit_venv.log" 2>&1 &&
    (cd "$WORK/src" && in_venv "$V" "pip install ." >"$LOGS/toolkit_install.log" 2>&1); then
    record "toolkit: pip install ." ok "$("$V/bin/edgeconv" --version 2>&1), $("$V/bin/edgeconv-runtime" --version 2>&1)"
    OUT=$(toolkit_imports "$V" 2>&1)
    expect "toolkit: packages installed, typed" "$(tail -n 1 <<<"$OUT")" grep -q "typed" <<<"$OUT"
    verify_bundle "$V" toolkit
else
    record "toolkit: pip install ." FAIL "see $LOGS/toolkit_install.log: $(tail -n 1 "$LOGS/toolkit_install.log" | cut -c1-80)"
fi
V="$WORK/venv-export"
if fresh_venv "$V" >"$LOGS/export_venv.log" 2>&1 && in_venv "$V" "pip install ./runtime ./export" >"$LOGS/export_install.log" 2>&1; then
    OUT=$(cd "$WORK" && "$V/bin/python" -c 'import edgeconv_export.bundle as b; print("edgeconv_export", b.FORMATS)' 2>&1)
    expect "export: pip install ./runtime ./export" "$(tail -n 1 <<<"$OUT")" grep -q "^edgeconv_export" <<<"$OUT"
else
    record "export: pip install ./runtime ./export" FAIL "see $LOGS/export_install.log: $(tail -n 1 "$LOGS/export_install.log" | cut -c1-80)"
fi
rm -rf "$WORK/src"

# ---------------------------------------------------------------- gpu: the documented NVIDIA command
if [ "${HAS_GPU:-}" = True ]; then CUDA_WANT="^onnxruntime-cuda yes"; CUDA_SAYS="yes"; else CUDA_WANT="^onnxruntime-cuda no no NVIDIA GPU found$"; CUDA_SAYS="no NVIDIA GPU found"; fi
V="$WORK/venv-gpu"
if [ -z "${GPU_COMMAND:-}" ]; then
    record "gpu: documented command" FAIL "not run: the CPU install failed"
elif fresh_venv "$V" >"$LOGS/gpu_venv.log" 2>&1 && in_venv "$V" "$GPU_COMMAND" >"$LOGS/gpu_install.log" 2>&1; then
    record "gpu: documented command" ok "$GPU_COMMAND"
    DISTS=$(ort_dists "$V")
    expect "gpu: only the GPU build installed" "$DISTS" grep -qx "onnxruntime-gpu [0-9.]*" <<<"$DISTS"
    PROV=$(providers "$V")
    expect "gpu: CUDAExecutionProvider listed" "$PROV" grep -q "\bCUDA\b" <<<"$PROV"
    ROW=$(backend_row "$V" onnxruntime-cuda)
    expect "gpu: backends says '$CUDA_SAYS'" "$ROW" cuda_usable
    ROW=$(backend_row "$V" onnxruntime-cpu)
    expect "gpu: onnxruntime-cpu still usable" "$ROW" grep -q "^onnxruntime-cpu yes" <<<"$ROW"
    verify_bundle "$V" gpu

    # ------------------------------------------------------------ mixed: a later CPU install over the GPU one
    if in_venv "$V" "pip install onnxruntime" >"$LOGS/mixed_install.log" 2>&1; then
        PROV=$(providers "$V")
        record "mixed: pip install onnxruntime on top" ok "$(ort_dists "$V"); providers now $PROV"
        ROW=$(backend_row "$V" onnxruntime-cuda)
        expect "mixed: backends names both + the fix" "$(cut -c1-150 <<<"$ROW")..." \
            grep -q "are both installed.*fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install" <<<"$ROW"

        # the tempting half-fix: uninstall only the CPU build, which takes the shared files with it
        in_venv "$V" "pip uninstall -y onnxruntime" >"$LOGS/half_fix.log" 2>&1
        ROW=$(backend_row "$V" onnxruntime-cuda)
        expect "half-fix: backends says the module is gone" "$(cut -c1-150 <<<"$ROW")..." \
            grep -q "is installed but its .onnxruntime. module is gone.*fix: pip install --force-reinstall" <<<"$ROW"
        FIX=${ROW##*fix: }
        if [ "$FIX" != "$ROW" ] && in_venv "$V" "$FIX" >"$LOGS/half_fix_repair.log" 2>&1; then
            PROV=$(providers "$V")
            ROW=$(backend_row "$V" onnxruntime-cuda)
            expect "half-fix: the printed fix works" "$FIX -> $PROV; $ROW" cuda_usable
        else
            record "half-fix: the printed fix works" FAIL "could not run '$FIX' (see $LOGS/half_fix_repair.log)"
        fi

        # the CPU build over the GPU one again, repaired with the line `backends` prints
        in_venv "$V" "pip install onnxruntime" >>"$LOGS/mixed_install.log" 2>&1
        ROW=$(backend_row "$V" onnxruntime-cuda)
        FIX=${ROW##*fix: }
        if [ "$FIX" != "$ROW" ] && in_venv "$V" "$FIX" >"$LOGS/mixed_fix.log" 2>&1; then
            PROV=$(providers "$V")
            ROW=$(backend_row "$V" onnxruntime-cuda)
            expect "mixed: the printed fix works" "$(ort_dists "$V"); $PROV; $ROW" cuda_usable
        else
            record "mixed: the printed fix works" FAIL "could not run '$FIX' (see $LOGS/mixed_fix.log)"
        fi
    else
        record "mixed: pip install onnxruntime on top" FAIL "see $LOGS/mixed_install.log"
    fi
else
    record "gpu: documented command" FAIL "see $LOGS/gpu_install.log: $(tail -n 1 "$LOGS/gpu_install.log" | cut -c1-80)"
fi

[ "${INSTALL_CHECK_KEEP:-0}" = 1 ] || rm -rf "$WORK/venv-cpu" "$WORK/venv-gpu" "$WORK/venv-toolkit" "$WORK/venv-export"
table
exit $FAILED
