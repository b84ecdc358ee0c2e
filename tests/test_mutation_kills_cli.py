"""The runtime command line (runtime/edgeconv_runtime/cli.py) in-process: its option types, its one-line refusals before a
model loads, the exit codes of verify/predict/evaluate/bench/backends/compare/keygen/build-engine on the real bundles,
and the numbers serve hands its server (MB -> bytes, ms -> s). In-process (main(argv) with the output captured), so
`make mutants` runs it once per mutant in seconds; tests/test_runtime.py and test_cli_conventions.py run the same
commands as subprocesses."""
import argparse
import hashlib
import json
import shutil

import numpy as np
import pytest

from bundle_helpers import edit_manifest
from edgeconv_runtime import preprocess, signing
from edgeconv_runtime.cli import _DefaultsShown, _ints, _list, _positive, build_parser, main


@pytest.fixture(autouse=True)
def _reset_process_settings():
    """--max-pixels and --public-key are process-wide settings: each test starts and ends with the defaults."""
    preprocess.set_max_pixels(None)
    signing.set_trusted_key(None)
    yield
    preprocess.set_max_pixels(None)
    signing.set_trusted_key(None)


def cli(capsys, *args) -> tuple:
    """(exit code, stdout, stderr) of `edgeconv-runtime ARGS`, run in this process."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_option_types():
    assert _ints("1,8, 32,") == [1, 8, 32] and _ints("1") == [1]
    for bad in ("0,1", "a", "", ",", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _ints(bad)
    assert _positive("1") == 1 and _positive("7") == 7
    for bad in ("0", "-3", "x", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number >= 1"):
            _positive(bad)
    assert _list(" fp32, ,int8 ,") == ["fp32", "int8"] and _list("") == []


def test_serve_help_shows_defaults_but_not_none_false_or_twice():
    text = " ".join(build_parser().commands["serve"].format_help().split())
    assert "(default 256)" in text and "(default 127.0.0.1)" in text
    f = _DefaultsShown("x")
    act = lambda **kw: argparse.Action(["--o"], "o", **kw)
    assert f._get_help_string(act(default=3, help="h")) == "h (default %(default)s)"
    assert f._get_help_string(act(default=None, help="h")) == "h"
    assert f._get_help_string(act(default=False, help="h")) == "h"
    assert f._get_help_string(act(default=3, help="h (default: three)")) == "h (default: three)"
    assert f._get_help_string(argparse.Action([], "pos", default=3, help="p")) == "p"


@pytest.mark.parametrize("args, needle", [
    (["predict", "B"], "predict needs image files or --source"),
    (["predict", "B", "a.png", "--source", "v.mp4"], "image files or --source, not both"),
    (["predict", "B", "a.png", "--every", "2"], "--every and --max-frames apply to --source only"),
    (["predict", "B", "a.png", "--max-frames", "2"], "--every and --max-frames apply to --source only"),
])
def test_predict_refusals_come_before_the_model_loads(capsys, args, needle):
    code, out, err = cli(capsys, *args)  # "B" is no bundle: the refusal must come first
    assert code == 2 and err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_predict_images_after_options_and_unknown_options(mnist_bundle, capsys):
    f = mnist_bundle / "reference" / "images" / "002.png"
    code, out, _ = cli(capsys, "predict", mnist_bundle, "--json", "--top-k", "2", f, f)
    assert code == 0 and len(json.loads(out)) == 2 and len(json.loads(out)[0]["top"]) == 2
    code, out, _ = cli(capsys, "predict", mnist_bundle, f, "--top-k", "1")
    assert code == 0 and out.startswith(f"{f}: ") and len(out.strip().split("  ")) == 1
    code, _, err = cli(capsys, "predict", mnist_bundle, f, "--top", "2")
    assert code == 2 and "unrecognized arguments: --top 2 (options are not abbreviated: did you mean --top-k?)" in err
    code, _, err = cli(capsys, "verify", mnist_bundle, "--zzz")
    assert code == 2 and "usage: edgeconv-runtime verify" in err and "unrecognized arguments: --zzz" in err and "did you mean" not in err
    code, _, err = cli(capsys, "predict", mnist_bundle, f, "-q")
    assert code == 2 and "unrecognized arguments: -q" in err


def test_max_pixels_is_the_decoders_cap_for_the_command(mnist_bundle, capsys):
    f = mnist_bundle / "reference" / "images" / "002.png"  # 28 x 28 = 784 pixels
    code, _, err = cli(capsys, "predict", mnist_bundle, f, "--max-pixels", "783")
    assert code == 2 and "over the cap of 783 pixels" in err
    assert cli(capsys, "predict", mnist_bundle, f, "--max-pixels", "784")[0] == 0
    assert preprocess.MAX_PIXELS == 784


def test_verify_exit_code_and_report(mnist_bundle, tmp_path, capsys):
    code, out, _ = cli(capsys, "verify", mnist_bundle, "--precision", "int8", "--backend", "onnxruntime-cpu")
    assert code == 0 and out.startswith("verify OK: onnxruntime-cpu int8 on 8 reference inputs") and "preprocessing max|diff|" in out
    code, out, _ = cli(capsys, "verify", mnist_bundle, "--json")
    r = json.loads(out)
    assert code == 0 and r["ok"] and r["precision"] == "fp32" and r["problems"] == []
    bad = tmp_path / "bad"
    shutil.copytree(mnist_bundle, bad)
    ref = np.load(bad / "reference" / "outputs.npy")
    np.save(bad / "reference" / "outputs.npy", ref[:, ::-1].copy())
    digest = hashlib.sha256((bad / "reference" / "outputs.npy").read_bytes()).hexdigest()
    edit_manifest(bad, lambda m: m["files"].update({"reference/outputs.npy": digest}))
    code, out, _ = cli(capsys, "verify", bad)
    assert code == 1 and out.startswith("verify FAILED") and "\n  top-1 agreement" in out
    code, out, _ = cli(capsys, "verify", bad, "--json")
    assert code == 1 and json.loads(out)["ok"] is False


def test_evaluate_prints_accuracy_per_class(rgb_bundle, catsdogs_tiny, capsys):
    code, out, _ = cli(capsys, "evaluate", rgb_bundle, catsdogs_tiny / "test", "--backend", "onnxruntime-cpu")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("accuracy ") and lines[0].endswith("on 32 images (onnxruntime-cpu, fp32)")
    assert [l.split()[0] for l in lines[1:]] == ["cats", "dogs"] and all(l.endswith("n=16") for l in lines[1:])
    code, out, _ = cli(capsys, "evaluate", rgb_bundle, catsdogs_tiny / "test", "--json")
    assert code == 0 and json.loads(out)["n"] == 32


def test_bench_compare_and_its_default_duration(mnist_bundle, tmp_path, capsys, monkeypatch):
    js = tmp_path / "b.json"
    code, out, _ = cli(capsys, "bench", mnist_bundle, "--backend", "onnxruntime-cpu", "--batch-sizes", "1,2", "--iterations", "3", "--warmup", "1", "--no-e2e", "--json", js)
    rows = json.loads(js.read_text())["rows"]
    assert code == 0 and [r["batch"] for r in rows] == [1, 2] and all(r["iterations"] == 3 for r in rows) and "onnxruntime-cpu" in out
    code, out, _ = cli(capsys, "compare", js, js, "--markdown")
    assert code == 0 and out.count("onnxruntime-cpu") == 4 and out.lstrip().startswith("|")
    from edgeconv_runtime import bench

    seen = []
    monkeypatch.setattr(bench, "run_bench", lambda cfg: seen.append(cfg) or {"rows": []})
    monkeypatch.setattr(bench, "write_outputs", lambda *a: None)
    monkeypatch.setattr(bench, "format_table", lambda r: "table")
    code, out, _ = cli(capsys, "bench", mnist_bundle)
    assert code == 1 and out == "table\n"  # no rows measured: exit 1
    assert seen[0].duration == 2.0 and seen[0].iterations is None and seen[0].batch_sizes == [1, 8, 32] and seen[0].end_to_end is True
    cli(capsys, "bench", mnist_bundle, "--duration", "0.5", "--shape", "1,28,28", "--no-e2e")
    assert seen[1].duration == 0.5 and seen[1].shape == (1, 28, 28) and seen[1].end_to_end is False


def test_serve_hands_its_server_bytes_and_seconds(mnist_bundle, capsys, monkeypatch):
    from edgeconv_runtime import serve

    seen = []
    monkeypatch.setattr(serve, "run_server", seen.append)
    code, _, _ = cli(capsys, "serve", mnist_bundle, "--max-body-mb", "2", "--max-header-kb", "3", "--max-json-mb", "0.5",
                     "--max-inflight-body-mb", "4", "--admit-wait-ms", "250", "--port", "0", "--max-pixels", "1000")
    c = seen[0]
    assert code == 0 and c.max_body_bytes == 2 * 1024 * 1024 and c.max_header_bytes == 3 * 1024 and c.max_json_bytes == 512 * 1024
    assert c.max_inflight_body_bytes == 4 * 1024 * 1024 and c.admit_wait_s == 0.25 and c.port == 0 and preprocess.MAX_PIXELS == 1000


def test_backends_build_engine_and_keygen(mnist_bundle, tmp_path, capsys):
    code, out, _ = cli(capsys, "backends")
    assert code == 0 and out.splitlines()[0].split()[:2] == ["onnxruntime-cpu", "yes"]
    from edgeconv_runtime.gpu import gpu_info

    if gpu_info() is None:  # with a GPU it would build (tests/test_gpu.py); without one: one line, exit 2, nothing written
        code, _, err = cli(capsys, "build-engine", mnist_bundle)
        assert code == 2 and err.startswith("error: no NVIDIA GPU found") and err.count("\n") == 1
    code, out, _ = cli(capsys, "keygen", tmp_path / "k")
    assert code == 0 and out.startswith(f"wrote {tmp_path / 'k.pem'}") and (tmp_path / "k.pub.pem").is_file()
    code, _, err = cli(capsys, "keygen", tmp_path / "k")
    assert code == 2 and err.startswith("error: ")
    assert cli(capsys, "keygen", tmp_path / "k", "--force")[0] == 0


def test_public_key_is_checked_on_every_bundle_the_command_opens(mnist_bundle, tmp_path, capsys):
    cli(capsys, "keygen", tmp_path / "k")
    f = mnist_bundle / "reference" / "images" / "002.png"
    code, _, err = cli(capsys, "predict", tmp_path / "nowhere", f, "--public-key", tmp_path / "k.pub.pem")
    assert code == 2 and "is not a bundle directory" in err
    code, _, err = cli(capsys, "predict", mnist_bundle, f, "--public-key", tmp_path / "k.pub.pem")
    assert code == 2 and "sign" in err.lower()  # the fixture bundle is unsigned: refused
    signed = tmp_path / "signed"
    shutil.copytree(mnist_bundle, signed)
    signing.sign_bundle(signed, tmp_path / "k.pem")
    assert cli(capsys, "predict", signed, f, "--public-key", tmp_path / "k.pub.pem")[0] == 0


def test_main_turns_a_closed_pipe_and_ctrl_c_into_exit_codes(monkeypatch, capsys):
    from edgeconv_runtime import cli as cli_module

    def boom(exc):
        def run(argv, prog):
            raise exc
        return run

    monkeypatch.setattr(cli_module, "run", boom(KeyboardInterrupt()))
    assert cli(capsys, "backends")[0] == 130
    monkeypatch.setattr(cli_module, "run", lambda argv, prog: 7)
    assert cli(capsys, "backends")[0] == 7


def test_build_engine_hands_the_builder_its_options_and_run_returns_0(mnist_bundle, capsys, monkeypatch):
    """The TensorRT builder itself needs a GPU (tests/test_gpu.py); here it is replaced to see what the command gives it,
    what it prints and that run() returns 0 (main() would exit 0 on None too: run's own result is checked)."""
    from types import SimpleNamespace

    from edgeconv_runtime import engine
    from edgeconv_runtime.cli import run

    seen = []
    monkeypatch.setattr(engine, "build_engines", lambda bundle, opts: seen.append((bundle, opts)) or [SimpleNamespace(file="model.fp16.plan")])
    code = run(["build-engine", str(mnist_bundle), "--precision", "fp16,int8", "--batch", "1,4,8", "--workspace-mb", "512", "--dla-core", "0",
                "--gpu-fallback"])
    out = capsys.readouterr().out
    assert code == 0 and out == f"added 1 engine(s) to {mnist_bundle}: model.fp16.plan\n"
    bundle, opts = seen[0]
    assert bundle == str(mnist_bundle) and opts.precisions == ("fp16", "int8") and opts.batch == (1, 4, 8) and opts.workspace_mb == 512
    assert opts.dla_core == 0 and opts.gpu_fallback is True
    assert run(["backends"]) == 0


def test_predict_batches_as_its_help_says_and_json_is_indented_by_two(mnist_bundle, capsys, monkeypatch):
    """--batch: "frames per inference (default 1 with --source, 32 for images)"; the JSON printed by predict, evaluate
    and verify is indented by 2 (what json.dumps(..., indent=2) gives back)."""
    from edgeconv_runtime import Model

    f = mnist_bundle / "reference" / "images" / "002.png"
    code, out, _ = cli(capsys, "verify", mnist_bundle, "--json")
    assert code == 0 and out == json.dumps(json.loads(out), indent=2) + "\n"
    code, out, _ = cli(capsys, "predict", mnist_bundle, f, "--json")
    assert code == 0 and out == json.dumps(json.loads(out), indent=2) + "\n"
    seen = []
    original = Model.predict
    monkeypatch.setattr(Model, "predict", lambda self, images, top_k=5, batch_size=32: seen.append(batch_size) or original(self, images, top_k, batch_size))
    cli(capsys, "predict", mnist_bundle, f)
    cli(capsys, "predict", mnist_bundle, f, "--batch", "5")
    assert seen == [32, 5]


def test_evaluate_json_is_indented_by_two(rgb_bundle, catsdogs_tiny, capsys):
    code, out, _ = cli(capsys, "evaluate", rgb_bundle, catsdogs_tiny / "test", "--json")
    assert code == 0 and out == json.dumps(json.loads(out), indent=2) + "\n"
