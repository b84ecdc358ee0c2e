#!/usr/bin/env bash
# ARM64 check under emulation (issue 12, section 4): the torch-free runtime installed from PyPI's
# aarch64 wheels in a Debian arm64 root run by qemu-user-static, against the same run on x86.
#
#   sudo benchmarks/arm64_check.sh          (needs root: apt-get, debootstrap, binfmt_misc, chroot, mount)
#
# 1. host tools (debootstrap, qemu-user-static, binfmt-support) and the aarch64 binfmt handler
# 2. a Debian arm64 root by debootstrap (reused when it exists), /proc mounted in it (not /sys:
#    its CPU lists make onnxruntime's cpuinfo crash under qemu), a venv, `pip install ./runtime`
#    from binary wheels only
# 3. bundles: chollet_mnist and efficientnet_lite0, FP32 + INT8, trained and exported here with the
#    repo's own tools unless MNIST_BUNDLE / LITE0_BUNDLE name existing ones
# 4. on each machine: `verify` FP32/INT8 on both bundles, `predict --json` on 50 real JPEGs
#    (lite0) and 50 MNIST t10k digits (mnist), preprocessed tensors and logits (arm64_probe.py)
# 5. arm64_compare.py: table + benchmarks/results/arm64_check.json/.md; exit 1 if the check fails
#
# Environment: ARM64_WORK (work folder, default /var/tmp/edgeconv-arm64), ARM64_ROOT (default
# $ARM64_WORK/root), ARM64_SUITE (bookworm), DEBIAN_MIRROR (default: the one this machine's apt uses),
# X86_VENV (default ./.venv), MNIST_BUNDLE, LITE0_BUNDLE, ARM64_THREADS (1), ARM64_JPEGS (50), ARM64_DIGITS (50),
# ARM64_RESULTS (results file name, default arm64_check: another bundle in LITE0_BUNDLE keeps the default run's results).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${ARM64_WORK:-/var/tmp/edgeconv-arm64}
ROOT=${ARM64_ROOT:-$WORK/root}
SUITE=${ARM64_SUITE:-bookworm}
X86_VENV=${X86_VENV:-$REPO/.venv}
DATA=${EDGECONV_DATA:-$REPO/../shared/data}
THREADS=${ARM64_THREADS:-1}
JPEGS=${ARM64_JPEGS:-50}
DIGITS=${ARM64_DIGITS:-50}
PY=$X86_VENV/bin/python
TIMES=$WORK/times.tsv
ARM_BASE=/opt/edgeconv            # as seen inside the root
ARM_HOST=$ROOT$ARM_BASE           # the same folder seen from the host
X86_BASE=$WORK/x86

die() { echo "error: $*" >&2; exit 2; }
now_ns() { date +%s%N; }
# phase NAME CMD...: run CMD, append "NAME<TAB>seconds<TAB>ran" to $TIMES
phase() {
  local name=$1 t0 t1; shift
  echo "== $name"
  t0=$(now_ns)
  "$@"
  t1=$(now_ns)
  printf '%s\t%s\t%s\n' "$name" "$(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.1f", d/1e9}')" ran >> "$TIMES"
}
skipped() { echo "== $1: skipped ($2)"; printf '%s\t0\tskipped: %s\n' "$1" "$2" >> "$TIMES"; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, debootstrap, binfmt_misc, chroot and mount need it)"
[ "$(uname -m)" = x86_64 ] || die "this script compares an emulated aarch64 root with this machine; run it on x86_64"
[ -x "$PY" ] || die "no x86 venv at $X86_VENV; set X86_VENV or create it (see README)"
mkdir -p "$WORK"
: > "$TIMES"
T_START=$(now_ns)

# ------------------------------------------------------------------------------------------- 1. host
host_tools() {
  local need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
  command -v update-binfmts >/dev/null || need+=(binfmt-support)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
  fi
}

binfmt_aarch64() {
  local d=/proc/sys/fs/binfmt_misc
  [ -e $d/register ] || mount -t binfmt_misc binfmt_misc $d
  [ -e $d/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 || true
  if [ ! -e $d/qemu-aarch64 ]; then
    # qemu's own aarch64 ELF magic/mask; F: the kernel opens the interpreter now, so the root needs no copy of it
    echo ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' > $d/register
  fi
  grep -qx enabled $d/qemu-aarch64 || die "binfmt handler qemu-aarch64 is registered but disabled; run: update-binfmts --enable qemu-aarch64"
  grep -q '^flags:.*F' $d/qemu-aarch64 || echo "warning: qemu-aarch64 handler lacks the F flag; chroot needs the interpreter inside the root" >&2
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m=""
  m=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  [ -n "$m" ] || m=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/ && $i !~ /security/) {print $i; exit}}' \
                     /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

phase host-tools host_tools
phase binfmt binfmt_aarch64

# ------------------------------------------------------------------------------------------- 2. root
mounted_under() { awk -v p="$1" '$2 == p || index($2, p "/") == 1' /proc/mounts | grep -q .; }

make_root() {
  local partial=$ROOT.partial mirror
  mounted_under "$partial" && die "something is mounted under $partial; unmount it first"
  rm -rf "$partial"
  mirror=$(debian_mirror)
  echo "debootstrap $SUITE arm64 from $mirror into $ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$partial" "$mirror" \
    > "$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log" >&2; die "debootstrap failed (log: $WORK/debootstrap.log)"; }
  mv "$partial" "$ROOT"
}

if [ -x "$ROOT/usr/bin/python3" ] && [ -f "$ROOT/etc/debian_version" ]; then
  skipped debootstrap "reused $ROOT"
else
  phase debootstrap make_root
fi

PROC_MOUNTED=0
cleanup() {
  if [ "$PROC_MOUNTED" = 1 ] && mountpoint -q "$ROOT/proc"; then umount "$ROOT/proc" || umount -l "$ROOT/proc"; fi
}
trap cleanup EXIT
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
PROC_MOUNTED=1  # unmounted at exit even when an earlier, interrupted run left it mounted
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# the CA bundle this machine's pip trusts (a TLS-intercepting proxy adds its own CA), for pip inside the root
HOST_CA=${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -f "$HOST_CA" ]; then cp -L "$HOST_CA" "$ROOT/etc/ssl/host-ca-bundle.crt"; fi

# in_root CMD...: run CMD in the aarch64 root with a clean environment and the venv first on PATH
in_root() {
  chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
    OMP_NUM_THREADS="$THREADS" PIP_CERT=/etc/ssl/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"
}
[ "$(in_root uname -m)" = aarch64 ] || die "the root does not run as aarch64 (uname -m says $(in_root uname -m))"

install_runtime() {
  if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
    in_root python3 -m venv /opt/venv 2>/dev/null || {
      in_root apt-get update -q && in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
      in_root python3 -m venv /opt/venv
    }
  fi
  rm -rf "$ROOT/opt/src/runtime"
  mkdir -p "$ROOT/opt/src"
  cp -r "$REPO/runtime" "$ROOT/opt/src/runtime"
  rm -rf "$ROOT"/opt/src/runtime/{build,*.egg-info}
  find "$ROOT/opt/src/runtime" -name __pycache__ -prune -exec rm -rf {} +
  # wheels only: nothing is compiled under emulation
  in_root pip install --only-binary=:all: /opt/src/runtime
}
phase pip-install install_runtime

# ------------------------------------------------------------------------------------------- 3. bundles
# bundle_path NAME VAR: the bundle named by $VAR, else $WORK/bundles/NAME (built and cached below)
bundle_path() {
  local name=$1 var=$2 given=${!2:-}
  if [ -n "$given" ]; then
    [ -f "$given/manifest.json" ] || die "$var=$given is not a bundle (no manifest.json)"
    echo "$given"
  else
    echo "$WORK/bundles/$name"
  fi
}
MNIST_B=$(bundle_path mnist MNIST_BUNDLE)
LITE0_B=$(bundle_path lite0 LITE0_BUNDLE)
build_bundle() {  # build_bundle OUT TRAIN_ARGS...
  local out=$1 run; shift
  run=$WORK/runs/$(basename "$out")
  "$X86_VENV/bin/edgeconv" train "$@" --out "$run" --force
  "$X86_VENV/bin/edgeconv" export "$run" --out "$out" --precision fp32,int8 --force
}
if [ -f "$MNIST_B/manifest.json" ]; then skipped bundle-mnist "reused $MNIST_B"; else
  phase bundle-mnist build_bundle "$MNIST_B" --data mnist-5k --test-data "$DATA/mnist" --model chollet_mnist --epochs 2
fi
if [ -f "$LITE0_B/manifest.json" ]; then skipped bundle-lite0 "reused $LITE0_B"; else
  phase bundle-lite0 build_bundle "$LITE0_B" --data "$DATA/cats_and_dogs_small" --model efficientnet_lite0 --strategy feature-extract --epochs 3
fi

# ------------------------------------------------------------------------------------------- 4. runs
stage() {  # stage HOST_BASE: the same bundles, images and probe for one side
  local base=$1
  rm -rf "$base"
  mkdir -p "$base/bundles" "$base/out"
  cp -r "$MNIST_B" "$base/bundles/mnist"
  cp -r "$LITE0_B" "$base/bundles/lite0"
  cp -r "$WORK/images" "$base/images"
  cp "$REPO/benchmarks/arm64_probe.py" "$base/"
}
make_images() {
  rm -rf "$WORK/images"
  "$PY" "$REPO/benchmarks/arm64_compare.py" images "$WORK/images" --jpegs "$JPEGS" --digits "$DIGITS"
  stage "$X86_BASE"
  stage "$ARM_HOST"
}
phase images make_images

# side_runs HOST_OUT SIDE_BASE RUNNER...: every command of the check, with RUNNER prefixed; stdout
# (the --json reports) lands in HOST_OUT, exit codes and seconds in HOST_OUT/timings.tsv
side_runs() {
  local out=$1 base=$2 rc t0 t1 b p images; shift 2
  : > "$out/timings.tsv"
  timed() {  # timed LABEL STDOUT_FILE|- CMD...
    local label=$1 file=$2; shift 2
    t0=$(now_ns)
    set +e
    if [ "$file" = - ]; then "$@"; else "$@" > "$file"; fi
    rc=$?
    set -e
    t1=$(now_ns)
    printf '%s\t%s\trc=%s\n' "$label" "$(awk -v d=$((t1 - t0)) 'BEGIN{printf "%.1f", d/1e9}')" "$rc" >> "$out/timings.tsv"
    echo "   $label rc=$rc"
  }
  for b in mnist lite0; do
    if [ $b = mnist ]; then images=digits; else images=jpeg; fi
    for p in fp32 int8; do
      timed "verify-$b-$p" "$out/verify.$b.$p.json" "$@" edgeconv-runtime verify "$base/bundles/$b" --backend onnxruntime-cpu \
        --precision $p --threads "$THREADS" --json
      # the images right after the bundle: they are a variable-length positional
      # shellcheck disable=SC2046
      timed "predict-$b-$p" "$out/predict.$b.$p.json" "$@" edgeconv-runtime predict "$base/bundles/$b" \
        $(cut -f1 "$WORK/images/$images/list.txt" | sed "s|^|$base/images/$images/|") \
        --backend onnxruntime-cpu --precision $p --threads "$THREADS" --top-k 1 --json
    done
    timed "probe-$b" - "$@" python "$base/arm64_probe.py" "$base/bundles/$b" "$base/images/$images/list.txt" \
      --out "$base/out/$b" --threads "$THREADS"
  done
}
phase runs-x86 side_runs "$X86_BASE/out" "$X86_BASE" env PATH="$X86_VENV/bin:$PATH" OMP_NUM_THREADS="$THREADS"
phase runs-arm64 side_runs "$ARM_HOST/out" "$ARM_BASE" in_root

# ------------------------------------------------------------------------------------------- 5. compare
printf 'total\t%s\tran\n' "$(awk -v d=$(($(now_ns) - T_START)) 'BEGIN{printf "%.1f", d/1e9}')" >> "$TIMES"
"$PY" "$REPO/benchmarks/arm64_compare.py" compare --x86 "$X86_BASE/out" --arm64 "$ARM_HOST/out" --images "$WORK/images" \
  --times "$TIMES" --command "benchmarks/arm64_check.sh (ARM64_THREADS=$THREADS, root $ROOT)" --name "${ARM64_RESULTS:-arm64_check}"
