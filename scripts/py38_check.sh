#!/usr/bin/env bash
# The runtime on Python 3.8 (JetPack 5 ships it): a fresh 3.8 venv, `pip install ./runtime`, then
# `verify` (FP32 and INT8) and `predict` on a real bundle, every runtime module imported, and the
# aarch64 wheels a JetPack 5 board would get. Prints a pass/fail table; exits 1 if any step failed.
# Re-runnable: the venv is rebuilt each time, the bundle is built once and reused.
#
#   scripts/py38_check.sh [BUNDLE]
#
# Settings (environment):
#   PY38            the 3.8 interpreter (default: python3.8 on PATH if it runs, else /root/.pyenv/versions/3.8.*/bin/python)
#   PY38_CHECK_DIR  work folder: venv/, logs/, run/, bundle/            (default /tmp/edgeconv-py38)
#   PIP_CACHE_DIR   pip's cache, shared between runs                   (default ~/.cache/edgeconv-install-check)
#   EDGECONV        the trainer used to build a bundle when none is given (default .venv/bin/edgeconv)
set -u

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
WORK=${PY38_CHECK_DIR:-/tmp/edgeconv-py38}
LOGS="$WORK/logs"
VENV="$WORK/venv"
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$HOME/.cache/edgeconv-install-check}
EDGECONV=${EDGECONV:-$ROOT/.venv/bin/edgeconv}
mkdir -p "$LOGS" "$PIP_CACHE_DIR" || exit 2
rm -f "$LOGS"/*.log

# shellcheck source=scripts/_rows.sh
. "$ROOT/scripts/_rows.sh"
table() {
    print_rows step 34 py38_check "logs: $LOGS"
}
step() {  # name log cmd...: run, record ok/FAIL with the log's last line
    local name=$1 log=$2
    shift 2
    if "$@" >"$log" 2>&1; then
        record "$name" ok "$(tail -n 1 "$log" | cut -c1-110)"
    else
        record "$name" FAIL "$(tail -n 1 "$log" | cut -c1-110)"
        return 1
    fi
}

# --- the 3.8 interpreter
PY38=${PY38:-}
if [ -z "$PY38" ]; then
    for cand in "$(command -v python3.8 2>/dev/null)" /root/.pyenv/versions/3.8*/bin/python; do
        if [ -n "$cand" ] && [ -x "$cand" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 8)' 2>/dev/null; then
            PY38=$cand
            break
        fi
    done
fi
if [ -z "$PY38" ]; then
    record "python 3.8" FAIL "no Python 3.8 interpreter found (set PY38)"
    table
    exit 1
fi
record "python 3.8" ok "$("$PY38" --version 2>&1) at $PY38"

# the official MNIST IDX files: $MNIST_DIR, else $EDGECONV_DATA/mnist (`make data`), else ../shared/data/mnist
MNIST=${MNIST_DIR:-${EDGECONV_DATA:-$ROOT/../shared/data}/mnist}

# --- the bundle: given, or built once with the trainer (FP32 + INT8)
BUNDLE=${1:-}
if [ -z "$BUNDLE" ]; then
    BUNDLE="$WORK/bundle"
    if [ ! -f "$BUNDLE/manifest.json" ]; then
        step "build bundle (1-epoch chollet_mnist)" "$LOGS/build.log" bash -c \
            "'$EDGECONV' train --data mnist-5k --test-data '$MNIST' --model chollet_mnist --epochs 1 --out '$WORK/run' \
             && '$EDGECONV' export '$WORK/run' --out '$BUNDLE' --precision fp32,int8 --force" || { table; exit 1; }
    fi
fi
if [ ! -f "$BUNDLE/manifest.json" ]; then
    record "bundle" FAIL "$BUNDLE has no manifest.json"
    table
    exit 1
fi
record "bundle" ok "$BUNDLE"

# --- fresh venv + the runtime alone
step "venv" "$LOGS/venv.log" "$PY38" -m venv --clear "$VENV" || { table; exit 1; }
PY="$VENV/bin/python"
CLI="$VENV/bin/edgeconv-runtime"
step "pip install ./runtime" "$LOGS/install.log" "$PY" -m pip install ./runtime || { table; exit 1; }
VERSIONS=$("$PY" - <<'EOF' 2>&1
import importlib.metadata as m
print(", ".join(f"{d} {m.version(d)}" for d in ("numpy", "onnxruntime", "pillow")))
EOF
)
if "$PY" -m pip list --format=freeze 2>/dev/null | grep -qi '^torch=='; then
    record "resolved for 3.8" FAIL "torch was installed: $VERSIONS"
else
    record "resolved for 3.8" ok "$VERSIONS (no torch)"
fi

# --- every runtime module imports on 3.8 (catches what compiling cannot: evaluated annotations, new stdlib names)
step "import every runtime module" "$LOGS/imports.log" "$PY" - <<'EOF'
import importlib, pkgutil, sys
import edgeconv_runtime
names = [m.name for m in pkgutil.walk_packages(edgeconv_runtime.__path__, "edgeconv_runtime.") if not m.name.endswith("__main__")]
optional = {"edgeconv_runtime.serve"}  # needs the [serve] extra (starlette)
failed, skipped = [], []
for name in names:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if name in optional and exc.name and not exc.name.startswith("edgeconv_runtime"):
            skipped.append(f"{name.split('.')[-1]} needs {exc.name}")
            continue
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
assert "torch" not in sys.modules, "torch was imported"
for f in failed:
    print(f)
note = f" (not installed here: {', '.join(skipped)})" if skipped else ""
print(f"{len(names) - len(failed) - len(skipped)}/{len(names)} modules import on Python {sys.version.split()[0]}{note}")
sys.exit(1 if failed else 0)
EOF

backends_check() {  # the table shows the CPU row, which must say yes
    "$CLI" backends || return 1
    grep '^onnxruntime-cpu *yes' <("$CLI" backends) | tr -s ' '
}
step "backends" "$LOGS/backends.log" backends_check

step "verify fp32" "$LOGS/verify_fp32.log" "$CLI" verify "$BUNDLE" --precision fp32
step "verify int8" "$LOGS/verify_int8.log" "$CLI" verify "$BUNDLE" --precision int8

# predict on real images: the bundle's reference images, plus the first 100 official MNIST test digits when
# the bundle is an MNIST model (written as PNGs by the 3.8 venv itself). Labels and probabilities must match
# the same command run by the main (3.11) environment when there is one.
mnist_pngs() {  # out-dir: 100 test digits as out-dir/<index>_<label>.png
    "$PY" - "$MNIST" "$1" <<'PYEOF'
import gzip, os, sys
import numpy as np
from PIL import Image
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
with gzip.open(os.path.join(src, "t10k-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:100]
with gzip.open(os.path.join(src, "t10k-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)[:100]
for i, (img, lab) in enumerate(zip(images, labels)):
    Image.fromarray(img).save(os.path.join(out, f"{i:03d}_{lab}.png"))
PYEOF
}
predict_check() {
    "$CLI" predict "$BUNDLE" "$@" --top-k 1 --json >"$WORK/predict38.json" || return 1
    local ref=""
    if [ -x "$ROOT/.venv/bin/edgeconv-runtime" ]; then
        "$ROOT/.venv/bin/edgeconv-runtime" predict "$BUNDLE" "$@" --top-k 1 --json >"$WORK/predict_main.json" || return 1
        ref="$WORK/predict_main.json"
    fi
    "$PY" - "$WORK/predict38.json" "$BUNDLE/manifest.json" "$ref" <<'PYEOF'
import json, os, re, sys
preds = json.load(open(sys.argv[1]))
classes = json.load(open(sys.argv[2]))["classes"]
labels = [p["top"][0]["label"] for p in preds]
assert labels and all(l in classes for l in labels), labels
msg = f"{len(labels)} images"
truth = [(m.group(1), l) for p, l in zip(preds, labels) for m in [re.match(r"\d+_(\w+)\.png$", os.path.basename(p["source"] or ""))] if m]
if truth:
    msg += f", MNIST test digits right {sum(t == l for t, l in truth)}/{len(truth)}"
if sys.argv[3]:
    ref = json.load(open(sys.argv[3]))
    same = sum(a["top"][0]["label"] == b["top"][0]["label"] for a, b in zip(preds, ref))
    diff = max(abs(a["top"][0]["probability"] - b["top"][0]["probability"]) for a, b in zip(preds, ref))
    msg += f"; top-1 as on Python 3.11 {same}/{len(ref)}, max |prob diff| {diff:.1e}"
    assert same == len(ref) == len(preds), msg
print(msg)
PYEOF
}
mapfile -t IMAGES < <(find "$BUNDLE/reference/images" -maxdepth 1 -type f 2>/dev/null | sort)
if [ -f "$MNIST/t10k-images-idx3-ubyte.gz" ] && "$PY" -c "import json, sys; sys.exit(json.load(open('$BUNDLE/manifest.json'))['classes'] != [str(i) for i in range(10)])" \
   && rm -rf "$WORK/mnist100" && mnist_pngs "$WORK/mnist100" >"$LOGS/mnist_pngs.log" 2>&1; then
    mapfile -t -O ${#IMAGES[@]} IMAGES < <(find "$WORK/mnist100" -name '*.png' | sort)
fi
if [ ${#IMAGES[@]} = 0 ]; then
    record "predict" FAIL "no images under $BUNDLE/reference/images"
else
    step "predict" "$LOGS/predict.log" predict_check "${IMAGES[@]}"
fi

# --- what a JetPack 5 board (aarch64, glibc 2.31, Python 3.8) would download: wheels only, nothing to compile
aarch64_wheels() {
    local reqs
    reqs=$("$PY" - <<'PYEOF'
import importlib.metadata as m
from pip._vendor.packaging.requirements import Requirement
for line in m.requires("edgeconv-runtime"):
    r = Requirement(line)
    if r.marker is None or r.marker.evaluate({"extra": ""}):   # we run on 3.8: these are the 3.8 ones
        r.marker = None
        print(r)
PYEOF
) || return 1
    rm -rf "$WORK/aarch64"
    # shellcheck disable=SC2086  # one requirement per line, none with spaces
    "$PY" -m pip download -q --only-binary=:all: --python-version 3.8 --implementation cp \
        --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64 \
        --platform manylinux_2_28_aarch64 --platform manylinux_2_31_aarch64 -d "$WORK/aarch64" $reqs || return 1
    echo "$(echo $reqs) -> $(ls "$WORK/aarch64" | grep -E '^(numpy|onnxruntime|pillow)-' | sed -E 's/-cp38.*//' | tr '\n' ' ')"
}
step "aarch64 cp38 wheels (JetPack 5)" "$LOGS/aarch64.log" aarch64_wheels

table
exit $FAILED
