#!/usr/bin/env bash
# The real datasets the tests, `make demo` and the benchmarks read, fetched from their public sources into one folder
# and checked against pinned sha256 sums:  $EDGECONV_DATA  (default ../shared/data, beside the checkout).
#
#   scripts/get_data.sh [--verify] [--catsdogs-from KAGGLE_TRAIN_DIR] [mnist] [hymenoptera] [catsdogs]
#
#   (no names)   all three
#   --verify     check what is there, download nothing (exit 1 if anything is missing or differs)
#   --catsdogs-from DIR   build cats_and_dogs_small from Kaggle's Dogs vs. Cats training images (DIR holds cat.N.jpg
#                and dog.N.jpg; see below) instead of only verifying a folder you put there yourself
#
#   mnist        the four official IDX files (gzip): byte-identical to the ones published by Yann LeCun, fetched from
#                the first source that answers (LeCun's page, then the mirrors torchvision and TensorFlow use); each
#                file's sha256 is pinned below, so any mirror is as good as the original.
#   hymenoptera  ants vs. bees, the PyTorch transfer-learning tutorial set: HYMENOPTERA_URL, unzipped. The zip's own
#                sha256 is not pinned (this project's copy was made without network access, so it could not be
#                computed); what is pinned is the digest of the extracted files (below), computed from the project's
#                copy: the download is accepted only if its train/ and val/ files are byte-identical to it. The zip's
#                sha256 is printed on every download: pin it in HYMENOPTERA_ZIP_SHA256 once you have seen it.
#   catsdogs     cats_and_dogs_small, the split of Chollet's Deep Learning with Python ch. 5 (train = cat/dog.0-999,
#                validation = 1000-1499, test = 1500-1999). There is NO official download of this small split: the
#                book builds it from Kaggle's Dogs vs. Cats competition training set (train.zip,
#                https://www.kaggle.com/c/dogs-vs-cats/data, a Kaggle login and accepting the competition's rules).
#                To build it: unzip train.zip and run  scripts/get_data.sh --catsdogs-from path/to/train catsdogs.
#                The project's copy came from a public copy of the same images resized to 200x200, so a split built
#                from the original Kaggle files has the right names and counts but not the pinned digest: the script
#                says so (and accepts it) rather than failing. A folder put in place by hand is verified the same way.
#
# Nothing here runs in CI or in the tests against the network (the tests point the URLs at file:// copies).
# Sources can be overridden (mirrors, offline copies): EDGECONV_MNIST_URLS (space-separated base URLs ending in /),
# EDGECONV_HYMENOPTERA_URL.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${EDGECONV_DATA:-$ROOT/../shared/data}

MNIST_URLS=${EDGECONV_MNIST_URLS:-"https://yann.lecun.com/exdb/mnist/ https://ossci-datasets.s3.amazonaws.com/mnist/ https://storage.googleapis.com/cvdf-datasets/mnist/"}
MNIST_SHA256="
440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609  train-images-idx3-ubyte.gz
3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c  train-labels-idx1-ubyte.gz
8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6  t10k-images-idx3-ubyte.gz
f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6  t10k-labels-idx1-ubyte.gz
"
HYMENOPTERA_URL=${EDGECONV_HYMENOPTERA_URL:-https://download.pytorch.org/tutorial/hymenoptera_data.zip}
HYMENOPTERA_ZIP_SHA256=""  # unknown (see above): the extracted files are checked instead
# tree digest (see tree_digest): sha256 of `sha256sum` over every file under these folders, sorted by path
HYMENOPTERA_TREE="train val"
HYMENOPTERA_TREE_SHA256=b0e3506710bc375be5996e1c9b29818c80cdfc19bcc324e560091da6690149ec
HYMENOPTERA_COUNTS="train/ants:124 train/bees:121 val/ants:70 val/bees:83"
CATSDOGS_TREE="train validation test"
CATSDOGS_TREE_SHA256=2b34cc89fc511b1f925d5f89bbad0af0265c0da19caf970839855ca259b173b4
CATSDOGS_COUNTS="train/cats:1000 train/dogs:1000 validation/cats:500 validation/dogs:500 test/cats:500 test/dogs:500"

VERIFY_ONLY=0
CATSDOGS_FROM=""
WHAT=()
while [ $# -gt 0 ]; do
    case $1 in
        --verify) VERIFY_ONLY=1 ;;
        --catsdogs-from) CATSDOGS_FROM=${2:?--catsdogs-from needs a folder}; shift ;;
        mnist|hymenoptera|catsdogs) WHAT+=("$1") ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "get_data.sh: unknown argument '$1' (names: mnist hymenoptera catsdogs; --verify, --catsdogs-from DIR)" >&2; exit 2 ;;
    esac
    shift
done
[ ${#WHAT[@]} -gt 0 ] || WHAT=(mnist hymenoptera catsdogs)

TMP=""
cleanup() { [ -z "$TMP" ] || rm -rf "$TMP"; }
trap cleanup EXIT
tmpdir() { [ -n "$TMP" ] || TMP=$(mktemp -d "${TMPDIR:-/tmp}/edgeconv-data.XXXXXX"); }

say() { printf '%-12s %s\n' "$1" "$2"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }

tree_digest() {  # folder subfolder... : one sha256 for every file under the subfolders (paths relative to folder)
    local dir=$1; shift
    (cd "$dir" && find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

counts_ok() {  # folder "sub:n ..." : every class folder holds n files
    local dir=$1 pair
    for pair in $2; do
        [ -d "$dir/${pair%%:*}" ] || return 1
        [ "$(find "$dir/${pair%%:*}" -type f | wc -l)" -eq "${pair##*:}" ] || return 1
    done
}

download() {  # url out
    if command -v curl >/dev/null; then
        curl -fsSL --connect-timeout 20 --retry 2 -o "$2" "$1"
    elif command -v wget >/dev/null; then
        wget -q -T 20 -O "$2" "$1"
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}

STATUS=0

get_mnist() {
    local dir=$DEST/mnist want name got url ok
    while read -r want name; do
        [ -n "$name" ] || continue
        if [ -f "$dir/$name" ] && [ "$(sha "$dir/$name")" = "$want" ]; then
            say mnist "ok        $name"
            continue
        fi
        if [ "$VERIFY_ONLY" = 1 ]; then
            if [ -f "$dir/$name" ]; then say mnist "DIFFERS   $dir/$name (sha256 $(sha "$dir/$name"), want $want)"; else say mnist "MISSING   $dir/$name"; fi
            STATUS=1; continue
        fi
        tmpdir; ok=0
        for url in $MNIST_URLS; do
            rm -f "$TMP/$name"
            if ! download "$url$name" "$TMP/$name" 2>/dev/null; then
                say mnist "(no answer from $url$name)"; continue
            fi
            got=$(sha "$TMP/$name")
            if [ "$got" != "$want" ]; then say mnist "(refused $url$name: sha256 $got, want $want)"; continue; fi
            mkdir -p "$dir" && mv -f "$TMP/$name" "$dir/$name" && ok=1 && break
        done
        if [ $ok = 1 ]; then say mnist "fetched   $name from $url"; else say mnist "FAILED    $name: no source gave the pinned file"; STATUS=1; fi
    done <<< "$MNIST_SHA256"
}

check_tree() {  # label folder "subfolders" digest "counts" : 0 identical, 1 missing/wrong counts, 2 right counts but other bytes
    local label=$1 dir=$2 subs=$3 want=$4 counts=$5 got
    if ! counts_ok "$dir" "$counts"; then return 1; fi
    # shellcheck disable=SC2086
    got=$(tree_digest "$dir" $subs)
    [ "$got" = "$want" ] && return 0
    say "$label" "(files under $dir differ from the project's copy: digest $got, want $want)"
    return 2
}

get_hymenoptera() {
    local dir=$DEST/hymenoptera_data rc=0
    check_tree hymenoptera "$dir" "$HYMENOPTERA_TREE" "$HYMENOPTERA_TREE_SHA256" "$HYMENOPTERA_COUNTS" || rc=$?
    if [ $rc = 0 ]; then say hymenoptera "ok        $dir"; return; fi
    if [ "$VERIFY_ONLY" = 1 ]; then
        if [ $rc = 1 ]; then say hymenoptera "MISSING   $dir (or not $HYMENOPTERA_COUNTS)"; else say hymenoptera "DIFFERS   $dir"; fi
        STATUS=1; return
    fi
    if [ -e "$dir" ]; then
        say hymenoptera "FAILED    $dir exists but is not the pinned set: move it away and run again"; STATUS=1; return
    fi
    tmpdir
    if ! download "$HYMENOPTERA_URL" "$TMP/hymenoptera.zip"; then
        say hymenoptera "FAILED    cannot download $HYMENOPTERA_URL"; STATUS=1; return
    fi
    local zsha; zsha=$(sha "$TMP/hymenoptera.zip")
    say hymenoptera "zip sha256 $zsha"
    if [ -n "$HYMENOPTERA_ZIP_SHA256" ] && [ "$zsha" != "$HYMENOPTERA_ZIP_SHA256" ]; then
        say hymenoptera "FAILED    refused $HYMENOPTERA_URL: sha256 $zsha, want $HYMENOPTERA_ZIP_SHA256"; STATUS=1; return
    fi
    mkdir -p "$TMP/unzip"
    python3 -m zipfile -e "$TMP/hymenoptera.zip" "$TMP/unzip"
    rc=0
    check_tree hymenoptera "$TMP/unzip/hymenoptera_data" "$HYMENOPTERA_TREE" "$HYMENOPTERA_TREE_SHA256" "$HYMENOPTERA_COUNTS" || rc=$?
    if [ $rc != 0 ]; then
        say hymenoptera "FAILED    the zip's train/ and val/ are not the pinned files: nothing installed"; STATUS=1; return
    fi
    mkdir -p "$DEST"
    mv "$TMP/unzip/hymenoptera_data" "$dir"
    say hymenoptera "fetched   $dir"
}

build_catsdogs() {  # kaggle train folder -> $TMP/cats_and_dogs_small in the book's split
    local src=$1 out=$TMP/cats_and_dogs_small split lo hi cls i
    for split in train:0:999 validation:1000:1499 test:1500:1999; do
        IFS=: read -r name lo hi <<< "$split"
        for cls in cat dog; do
            mkdir -p "$out/$name/${cls}s"
            for ((i = lo; i <= hi; i++)); do
                [ -f "$src/$cls.$i.jpg" ] || { say catsdogs "FAILED    $src/$cls.$i.jpg missing (want Kaggle's train/ with cat.N.jpg, dog.N.jpg)"; return 1; }
                cp "$src/$cls.$i.jpg" "$out/$name/${cls}s/"
            done
        done
    done
}

get_catsdogs() {
    local dir=$DEST/cats_and_dogs_small rc=0
    if [ -n "$CATSDOGS_FROM" ] && [ "$VERIFY_ONLY" = 0 ]; then
        if [ -e "$dir" ]; then say catsdogs "FAILED    $dir exists: move it away to build it again"; STATUS=1; return; fi
        tmpdir
        build_catsdogs "$CATSDOGS_FROM" || { STATUS=1; return; }
        mkdir -p "$DEST"
        mv "$TMP/cats_and_dogs_small" "$dir"
        say catsdogs "built     $dir from $CATSDOGS_FROM"
    fi
    check_tree catsdogs "$dir" "$CATSDOGS_TREE" "$CATSDOGS_TREE_SHA256" "$CATSDOGS_COUNTS" || rc=$?
    case $rc in
        0) say catsdogs "ok        $dir (byte-identical to the project's copy)" ;;
        2) say catsdogs "ok        $dir has the book's split (names, counts) but other image bytes than the project's 200x200 copy: accuracy figures may differ slightly" ;;
        *) say catsdogs "MISSING   $dir: no official download of this split exists; build it from Kaggle's Dogs vs. Cats train.zip with --catsdogs-from DIR (see scripts/get_data.sh)"
           STATUS=1 ;;
    esac
}

echo "data folder: $DEST"
for w in "${WHAT[@]}"; do "get_$w"; done
exit $STATUS
