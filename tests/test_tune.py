"""`edgeconv-runtime tune` (issue 25): every usable backend x precision x INT8 graph x settings measured on this machine on
real inputs, the ones that lose accuracy dropped, the fastest kept in the bundle as this device's profile, and that
profile run by Model.load / predict / bench / serve; a forged profile (another device, other library versions) is
ignored with a note, an edited one refuses the bundle, a stop at the budget keeps the best so far, Ctrl-C writes nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from edgeconv_runtime import EdgeconvError, Model
from edgeconv_runtime.fileio import sha256_file
from edgeconv_runtime.profiles import device_id, profile_path
from edgeconv_runtime.tune import TuneConfig, format_tune_table, run_tune

from bundle_helpers import copy_bundle, edit_manifest
from interrupt_helpers import interrupt_when

RUNTIME = [sys.executable, "-m", "edgeconv_runtime"]
FAST = dict(rounds=2, slice_s=0.03, budget_s=120.0)


def runtime(*args, timeout=300):
    return subprocess.run([*RUNTIME, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def model_files(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    return {a["file"]: sha256_file(bundle / a["file"]) for a in m["artifacts"]}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, mnist_bundle):
    """A copy of the real MNIST bundle (FP32, FP16, INT8) tuned for latency through the CLI, with its JSON."""
    bundle = copy_bundle(mnist_bundle, tmp_path_factory.mktemp("tune") / "bundle")
    before = model_files(bundle)
    out = bundle.parent / "tune.json"
    r = runtime("tune", bundle, "--budget-s", 120, "--rounds", 2, "--batch-sizes", "1,8", "--json", out)
    return {"bundle": bundle, "result": r, "json": out, "before": before}


def test_tune_measures_chooses_and_writes_the_profile(tuned):
    r, bundle = tuned["result"], tuned["bundle"]
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    result = json.loads(tuned["json"].read_text())
    rows = result["rows"]
    assert result["kind"] == "tune" and result["objective"] == "latency"
    # the real candidates of this machine: FP32, FP16 and INT8 on ONNX Runtime, with several thread settings each
    seen = {(row["backend"], row["precision"]) for row in rows}
    assert {("onnxruntime-cpu", "fp32"), ("onnxruntime-cpu", "fp16"), ("onnxruntime-cpu", "int8")} <= seen
    assert len({row["config"] for row in rows if row["backend"] == "onnxruntime-cpu" and row["precision"] == "fp32"}) >= 3
    assert {row["batch"] for row in rows} == {1}  # latency: the smallest batch size
    assert all(row["rounds"] == (3 if row["final"] else 2) and row["p50_ms"] > 0 for row in rows)
    # the best screening rows and the default configuration are timed again head to head; the choice is made there
    finals = [row for row in rows if row["final"]]
    assert 2 <= len(finals) <= 5 and all("screening_p50_ms" in row for row in finals)
    assert any(row["backend"] == "onnxruntime-cpu" and row["precision"] == "fp32" and row["default_threads"] and not row["options"]
               for row in finals)
    screened = sorted(rows, key=lambda row: row.get("screening_p50_ms", row["p50_ms"]))
    assert all(row["final"] for row in screened[:4])
    # one chosen row, the fastest finalist within the tie margin, marked in the table
    chosen = [row for row in rows if row["chosen"]]
    assert len(chosen) == 1 and chosen[0] == result["chosen"] and chosen[0]["final"]
    assert chosen[0]["p50_ms"] <= min(row["p50_ms"] for row in finals) * 1.0301
    assert rows == sorted(rows, key=lambda row: (not row["final"], row["p50_ms"]))
    starred = [line for line in r.stdout.splitlines() if line.startswith("*")]
    assert len(starred) == 1 and chosen[0]["backend"] in starred[0]
    # a skipped backend says why (no GPU here: the GPU backends)
    assert all(s["reason"] for s in result["skipped"])
    # the profile: listed in the manifest with its sha256; model files untouched; the bundle still verifies
    rel = result["profile"]
    assert rel == profile_path() and rel == f"profiles/{device_id()}.json"
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["files"][rel] == sha256_file(bundle / rel)
    assert model_files(bundle) == tuned["before"]
    doc = json.loads((bundle / rel).read_text())
    assert doc["config"]["backend"] == chosen[0]["backend"] and doc["config"]["precision"] == chosen[0]["precision"]
    assert doc["device"]["cores"] >= 1 and doc["versions"]["onnxruntime"] and doc["measured"]["p50_ms"] == chosen[0]["p50_ms"]
    v = runtime("verify", bundle)
    assert v.returncode == 0, v.stdout + v.stderr


def test_model_load_predict_bench_and_serve_run_the_profile(tuned, mnist_test_dir):
    bundle = tuned["bundle"]
    doc = json.loads((bundle / profile_path()).read_text())
    cfg = doc["config"]
    with Model.load(bundle) as model:
        assert model.info["profile"]["path"] == profile_path()
        assert model.backend_name == cfg["backend"] and model.precision == cfg["precision"]
        if cfg.get("threads"):
            assert model.backend.threads == cfg["threads"]
        if cfg.get("options"):
            assert model.backend.describe().get("tuning") == cfg["options"] or model.backend.describe().get("performance_hint")
    with Model.load(bundle, profile=False) as model:
        assert "profile" not in model.info and model.precision == "fp32"
    with Model.load(bundle, precision="fp32") as model:  # an explicit precision wins
        assert model.precision == "fp32"
        if cfg["precision"] != "fp32":
            assert "profile" not in model.info and "running fp32 as asked" in model.info["profile_note"]
    b = runtime("bench", bundle, "--batch-sizes", 1, "--duration", 0.2, "--no-e2e", "--json", bundle.parent / "bench.json")
    assert b.returncode == 0, b.stderr
    row = json.loads((bundle.parent / "bench.json").read_text())["rows"][0]
    assert row["profile"] == profile_path() and row["precision"] == cfg["precision"] and row["backend"] == cfg["backend"]
    b = runtime("bench", bundle, "--batch-sizes", 1, "--duration", 0.2, "--no-e2e", "--no-profile", "--json", bundle.parent / "bench2.json")
    row = json.loads((bundle.parent / "bench2.json").read_text())["rows"][0]
    assert "profile" not in row and row["precision"] == "fp32"
    from edgeconv_runtime.serve import ServeConfig, create_app

    app = create_app(ServeConfig(str(bundle)))
    try:
        assert app.model.info["profile"]["path"] == profile_path() and app.model.backend_name == cfg["backend"]
    finally:
        app.model.close()


def test_compare_reads_tune_results(tuned, tmp_path):
    other = json.loads(tuned["json"].read_text())
    other["environment"]["cpu"] = "Other CPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    r = runtime("compare", tuned["json"], tmp_path / "other.json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "config" in lines[0] and sum("Other CPU" in line for line in lines) == len(other["rows"])
    assert sum(" * " in line for line in lines[1:]) == 2  # each run's chosen row


def _forge(bundle: Path, fn) -> None:
    """Edit the profile and record its new sha256 in a resealed manifest: a consistent bundle, as an attacker or a copy from
    another machine would give."""
    rel = profile_path()
    doc = json.loads((bundle / rel).read_text())
    fn(doc)
    (bundle / rel).write_text(json.dumps(doc))
    edit_manifest(bundle, lambda m: m["files"].__setitem__(rel, sha256_file(bundle / rel)))


def test_a_profile_from_another_device_or_other_versions_is_ignored_with_a_note(tuned, tmp_path):
    forged = copy_bundle(tuned["bundle"], tmp_path / "forged")
    _forge(forged, lambda d: d["device"].__setitem__("cpu", "Some Other CPU"))
    with Model.load(forged) as model:
        assert "profile" not in model.info and model.precision == "fp32"
        assert "another device" in model.info["profile_note"]
    image = forged / json.loads((forged / "manifest.json").read_text())["reference"]["images"][0]
    r = runtime("predict", forged, image, "--top-k", 1)
    assert r.returncode == 0 and "note: profile" in r.stderr and "another device" in r.stderr, r.stderr
    older = copy_bundle(tuned["bundle"], tmp_path / "older")
    _forge(older, lambda d: d["versions"].__setitem__("onnxruntime", "1.0.0"))
    with Model.load(older) as model:
        assert "profile" not in model.info and "other library versions" in model.info["profile_note"]
        assert "onnxruntime 1.0.0 ->" in model.info["profile_note"]
    # a profile named for another device id: never read for this one
    moved = copy_bundle(tuned["bundle"], tmp_path / "moved")
    rel = profile_path()
    (moved / "profiles" / "jetson-orin-6c-00000000.json").write_bytes((moved / rel).read_bytes())
    (moved / rel).unlink()
    edit_manifest(moved, lambda m: m["files"].update({"profiles/jetson-orin-6c-00000000.json": m["files"].pop(rel)}))
    with Model.load(moved) as model:
        assert "profile" not in model.info and "no tuned profile for this device" in model.info["profile_note"]


def test_an_edited_profile_refuses_the_bundle(tuned, tmp_path):
    bundle = copy_bundle(tuned["bundle"], tmp_path / "edited")
    rel = profile_path()
    doc = json.loads((bundle / rel).read_text())
    doc["config"]["threads"] = 64
    (bundle / rel).write_text(json.dumps(doc))  # the manifest still lists the old sha256
    with pytest.raises(EdgeconvError, match="profiles/"):
        Model.load(bundle)
    for cmd in (["verify", bundle], ["bench", bundle, "--batch-sizes", 1, "--duration", 0.1]):
        r = runtime(*cmd)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "profiles/" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_dropping_a_candidate_that_loses_agreement(mnist_bundle):
    """The drop rule on real outputs: against a reference whose logits are negated (its top-1 is the least likely class), the FP32 graph agrees on none."""
    from edgeconv_runtime.bundle import read_bundle
    from edgeconv_runtime.tune import _accuracy_pass, _Engine

    x, expected = read_bundle(mnist_bundle).reference_tensors()
    cfg = TuneConfig(str(mnist_bundle), max_drop=0.5)
    skipped = []
    engine = _Engine("onnxruntime-cpu", "fp32", None)
    assert _accuracy_pass(cfg, engine, x, None, -expected, None, skipped, lambda _: None) is None
    assert engine.agreement < 0.9 and "points lost > --max-drop 0.5" in skipped[0]["reason"]
    kept = _accuracy_pass(TuneConfig(str(mnist_bundle), max_drop=100), _Engine("onnxruntime-cpu", "fp32", None), x, None,
                          -expected, None, [], lambda _: None)
    assert kept is not None
    kept.close()


def test_budget_stop_keeps_the_best_so_far(mnist_bundle, tmp_path):
    bundle = copy_bundle(mnist_bundle, tmp_path / "b")
    result = run_tune(TuneConfig(str(bundle), budget_s=0.01, rounds=3, slice_s=0.02, batch_sizes=(1,)))
    assert result["stopped_early"] and result["chosen"] is not None and result["profile"] == profile_path()
    assert any("--budget-s reached" in s["reason"] for s in result["skipped"])
    assert "stopped at --budget-s" in format_tune_table(result)


def test_ctrl_c_writes_nothing(mnist_bundle, tmp_path):
    """SIGINT in the middle of measuring: exit 130, the bundle byte for byte as before, even in a process that inherited
    SIGINT as ignored (a background job)."""
    bundle = copy_bundle(mnist_bundle, tmp_path / "b")
    manifest = (bundle / "manifest.json").read_bytes()
    cmd = [sys.executable, "-m", "edgeconv_runtime", "tune", str(bundle), "--rounds", "50"]
    code, err = interrupt_when(cmd, lambda err: "round 1/" in err, tmp_path / "err.txt", not_ready="no timing round")
    assert code == 130 and "nothing written" in err and "Traceback" not in err, err
    assert (bundle / "manifest.json").read_bytes() == manifest and not (bundle / "profiles").exists()


def test_bad_requests_are_one_line_and_write_nothing(mnist_bundle, tmp_path):
    bundle = copy_bundle(mnist_bundle, tmp_path / "b")
    manifest = (bundle / "manifest.json").read_bytes()
    for args, words in ((["--objective", "speed"], "invalid choice"), (["--max-drop", "-1"], "--max-drop"),
                        (["--data", tmp_path / "nowhere"], "image folder not found"), (["--precision", "int4"], "unknown precision"),
                        (["--backend", "tpu"], "unknown backend"), (["--budget-s", "0"], "--budget-s")):
        r = runtime("tune", bundle, *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr and words in r.stderr, (args, r.stderr)
    r = runtime("tune", tmp_path / "nothing")
    assert r.returncode == 2 and "not a bundle directory" in r.stderr
    assert (bundle / "manifest.json").read_bytes() == manifest and not (bundle / "profiles").exists()


def test_a_signed_bundle_needs_its_key_to_take_a_profile(mnist_bundle, tmp_path):
    pytest.importorskip("cryptography", reason="signing needs the [sign] extra")
    from edgeconv_runtime.signing import keygen, sign_bundle

    private, public, _ = keygen(tmp_path / "owner")
    bundle = copy_bundle(mnist_bundle, tmp_path / "b")
    sign_bundle(bundle, private)
    manifest = (bundle / "manifest.json").read_bytes()
    r = runtime("tune", bundle, "--budget-s", 5, "--rounds", 1)
    assert r.returncode == 2 and "--sign-key" in r.stderr and r.stderr.count("\n") == 1
    assert (bundle / "manifest.json").read_bytes() == manifest
    r = runtime("tune", bundle, "--budget-s", 20, "--rounds", 1, "--batch-sizes", 1, "--sign-key", private)
    assert r.returncode == 0, r.stderr
    with Model.load(bundle, public_key=public) as model:
        assert model.info["profile"]["path"] == profile_path()


def test_tune_on_an_imported_plain_onnx_bundle_for_throughput(rgb_bundle, catsdogs_tiny, tmp_path):
    """A plain ONNX file (an edgeconv graph with its metadata stripped, as any exporter writes it), imported with
    `edgeconv import` (FP32 + INT8), tuned on real photos for throughput."""
    import onnx

    m = json.loads((rgb_bundle / "manifest.json").read_text())
    graph = onnx.load(str(rgb_bundle / "model.onnx"))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "plain.onnx"))
    (tmp_path / "labels.txt").write_text("\n".join(m["classes"]) + "\n")
    pre = m["preprocess"]
    out = tmp_path / "imported"
    r = subprocess.run([sys.executable, "-m", "edgeconv", "import", str(tmp_path / "plain.onnx"), "--out", str(out), "--labels",
                        str(tmp_path / "labels.txt"), "--mean", ",".join(map(str, pre["mean"])), "--std", ",".join(map(str, pre["std"])),
                        "--calib-data", str(catsdogs_tiny / "train"), "--val-data", str(catsdogs_tiny / "validation"),
                        "--precision", "fp32,int8", "--max-accuracy-drop", "100"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = run_tune(TuneConfig(str(out), data=str(catsdogs_tiny / "test"), objective="throughput", batch_sizes=(1, 8), max_drop=100, **FAST))
    print(format_tune_table(result))
    assert result["chosen"] is not None and result["fp32_accuracy"] is not None
    assert {row["batch"] for row in result["rows"]} == {1, 8}
    assert result["chosen"]["throughput_ips"] >= max(row["throughput_ips"] for row in result["rows"] if row["final"]) / 1.0301
    assert all(row["accuracy"] is not None for row in result["rows"])
    with Model.load(out) as model:
        assert model.info["profile"]["config"]["batch"] == result["chosen"]["batch"]
