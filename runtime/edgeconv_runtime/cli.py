"""``edgeconv-runtime``: predict, evaluate, verify, bench, backends. argparse only: no extra dependencies."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import __version__
from .errors import EdgeconvError
from .manifest import RUNTIME_PRECISIONS


class _DefaultsShown(argparse.HelpFormatter):
    """Help that shows each option's default (`serve --help`); not None or False (off, or chosen at run time), nor
    where the help already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "(default" in text:
            return text
        return f"{text} (default %(default)s)".strip()


def _backend_names() -> str:
    from .backends import BACKENDS  # the registry: a new backend shows up in every --backend help

    return ", ".join(BACKENDS)


class _Parser(argparse.ArgumentParser):
    """No silent abbreviation, on every parser and subparser: `--batch-size` must not quietly mean `--batch-sizes`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _ints(s: str) -> list:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {s!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 1, got {s!r}")
    return vals


def _positive(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {s!r}")
    return v


def _list(s: str) -> list:
    return [v.strip() for v in s.split(",") if v.strip()]


def _max_pixels(sp) -> None:
    from .preprocess import DEFAULT_MAX_PIXELS

    sp.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                    help=f"refuse images whose header declares more pixels than this, before decoding (default {DEFAULT_MAX_PIXELS})")


def _no_profile(sp) -> None:
    sp.add_argument("--no-profile", action="store_true",
                    help="ignore the bundle's tuned profile for this device (`tune`) and use the default order")


def _public_key(sp) -> None:
    sp.add_argument("--public-key", default=None, metavar="PUB.pem",
                    help="refuse a bundle not signed by this Ed25519 key (manifest.sig; `keygen` makes a pair, `edgeconv export --sign-key` signs)")


def build_parser(prog: str = "edgeconv-runtime") -> argparse.ArgumentParser:
    """``prog`` names the command typed, in usage lines: ``edgeconv`` passes its runtime commands through here."""
    p = _Parser(prog=prog, description="Run edgeconv bundles without PyTorch.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p.commands = sub.choices  # name -> subparser, for errors in the subcommand's own words

    def common(sp, precision_default=None):
        sp.add_argument("bundle", help="bundle directory (or a .onnx / .plan file)")
        sp.add_argument("--backend", default="auto", help=f"auto (default), {_backend_names()}")
        sp.add_argument("--precision", default=precision_default, choices=list(RUNTIME_PRECISIONS))
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
        _no_profile(sp)
        _public_key(sp)

    sp = sub.add_parser("predict", help="top-k classes for images, or for the frames of a video, stream or camera",
                        epilog="With --source: one line per classified frame (frame, time in the source, latency, top-k), then a "
                               "summary (frames, frames/s, latency percentiles). Exit 0 at the end of the source or --max-frames; "
                               "exit 1 (after the summary) when the source ends early: a truncated video, a stream that stalls; "
                               "Ctrl-C ends the stream after the current batch, prints the summary and exits 130.")
    common(sp)
    sp.add_argument("images", nargs="*", help="image files (or --source)")
    _max_pixels(sp)
    sp.add_argument("--source", default=None,
                    help="video file, rtsp://..., /dev/videoN or csi://N (Jetson CSI camera); needs pip install 'edgeconv-runtime[video]'")
    sp.add_argument("--top-k", type=int, default=5)
    sp.add_argument("--json", action="store_true", help="JSON; with --source one line per frame and a summary line last")
    sp.add_argument("--every", type=_positive, default=None, help="--source: classify every N-th frame (default 1)")
    sp.add_argument("--max-frames", type=_positive, default=None, help="--source: stop after N classified frames")
    sp.add_argument("--batch", type=_positive, default=None, help="frames per inference (default 1 with --source, 32 for images)")

    sp = sub.add_parser("evaluate", help="accuracy on a folder of class sub-folders")
    common(sp)
    sp.add_argument("image_dir")
    sp.add_argument("--json", action="store_true")
    _max_pixels(sp)

    sp = sub.add_parser("verify", help="re-run the bundle's reference inputs on this device")
    common(sp)
    sp.add_argument("--json", action="store_true")
    _max_pixels(sp)

    sp = sub.add_parser("bench", help="latency/throughput per backend x precision x batch size")
    sp.add_argument("bundle", help="bundle directory, or any .onnx file (random inputs, or --data images)")
    sp.add_argument("--backend", type=_list, default=["auto"], help=f"comma list of auto (default), {_backend_names()}")
    sp.add_argument("--precision", type=_list, default=None,
                    help=f"comma list of {', '.join(RUNTIME_PRECISIONS)} (default: the tuned profile's with --backend auto, else fp32)")
    sp.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    sp.add_argument("--warmup", type=int, default=10)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, default=None)
    g.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 2)")
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--data", default=None, help="class-folder images: report accuracy beside speed (a plain .onnx file: its inputs)")
    sp.add_argument("--shape", type=_ints, default=None, help="a plain .onnx file with open input dimensions: one item's shape, e.g. 3,224,224")
    sp.add_argument("--no-e2e", action="store_true", help="skip end-to-end (JPEG bytes -> label) timing")
    _no_profile(sp)
    _public_key(sp)
    sp.add_argument("--json", dest="json_path", default=None)
    sp.add_argument("--csv", dest="csv_path", default=None)
    sp.add_argument("--plot", dest="plot_path", default=None)

    sp = sub.add_parser("tune", help="find the fastest backend x precision x threads x batch that keeps its accuracy here; keep it in the bundle",
                        formatter_class=_DefaultsShown,
                        epilog="Writes profiles/<device id>.json into the bundle (listed and hashed in its manifest; model files are "
                               "never touched). `predict`, `serve`, `bench` and Model.load(backend='auto') then run it on this device; "
                               "--no-profile there ignores it. A stop at --budget-s keeps the best so far; Ctrl-C writes nothing.")
    sp.add_argument("bundle", help="bundle directory written by `edgeconv export` or `edgeconv import`")
    sp.add_argument("--data", default=None, help="class-folder images to measure accuracy on (default: the bundle's reference inputs, "
                                                 "agreement with FP32)")
    sp.add_argument("--max-drop", type=float, default=0.5, help="points of accuracy (or agreement with FP32) a configuration may lose")
    sp.add_argument("--objective", choices=["latency", "throughput"], default="latency",
                    help="latency: p50 at the smallest batch size; throughput: images/s at any batch size")
    sp.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    sp.add_argument("--budget-s", type=float, default=300.0, help="stop measuring after this many seconds and keep the best so far")
    sp.add_argument("--backend", type=_list, default=None, help=f"only these backends (comma list of {_backend_names()})")
    sp.add_argument("--precision", type=_list, default=None, help=f"only these precisions (comma list of {', '.join(RUNTIME_PRECISIONS)})")
    sp.add_argument("--max-images", type=_positive, default=500, help="--data images used (spread over the classes)")
    sp.add_argument("--rounds", type=_positive, default=5, help="alternating timing rounds")
    sp.add_argument("--no-write", action="store_true", help="measure and print; write no profile")
    sp.add_argument("--sign-key", default=None, metavar="KEY.pem", help="a signed bundle: sign it again after adding the profile")
    sp.add_argument("--json", dest="json_path", default=None, help="write the result (every row, the choice) as JSON; `compare` reads it")
    _max_pixels(sp)
    _public_key(sp)

    sp = sub.add_parser("serve", help="HTTP inference server with dynamic batching", formatter_class=_DefaultsShown)
    sp.add_argument("bundle")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; another address is an explicit choice)")
    sp.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    sp.add_argument("--backend", default="auto", help=f"auto or one of {_backend_names()}")
    sp.add_argument("--precision", default=None, choices=list(RUNTIME_PRECISIONS))
    sp.add_argument("--max-batch", type=int, default=32, help="1 turns dynamic batching off")
    sp.add_argument("--max-delay-ms", type=float, default=5.0, help="how long a batch waits to fill")
    sp.add_argument("--max-queue", type=int, default=256, help="images waiting; beyond it requests get 503")
    sp.add_argument("--max-body-mb", type=float, default=10.0, help="one request's body (413)")
    sp.add_argument("--timeout-s", type=float, default=10.0, help="per-request inference timeout (504)")
    sp.add_argument("--workers", type=int, default=2, help="decode/preprocess threads")
    sp.add_argument("--threads", type=int, default=None, help="inference threads")
    _max_pixels(sp)
    sp.add_argument("--body-timeout-s", type=float, default=10.0, help="the whole body must arrive within this (408)")
    sp.add_argument("--header-timeout-s", type=float, default=10.0, help="request headers must arrive within this (408, closed)")
    sp.add_argument("--max-header-kb", type=float, default=64.0, help="request line + headers (431)")
    sp.add_argument("--max-json-mb", type=float, default=8.0, help="JSON bodies (413)")
    sp.add_argument("--max-inflight-body-mb", type=float, default=64.0, help="bodies held by all requests together (503)")
    sp.add_argument("--admit-wait-ms", type=float, default=100.0, help="how long a request waits for a queue place before 503")
    _no_profile(sp)
    _public_key(sp)

    sp = sub.add_parser("build-engine", help="build TensorRT engines on this device from the bundle's ONNX files")
    sp.add_argument("bundle", help="bundle directory written by `edgeconv export`")
    sp.add_argument("--precision", type=_list, default=["fp32"], help="comma list of fp32, fp16, int8 (default fp32)")
    sp.add_argument("--batch", default="1,8,32", help="optimization profile MIN,OPT,MAX batch (default 1,8,32)")
    sp.add_argument("--workspace-mb", type=int, default=2048, help="builder workspace in MB (default 2048)")
    sp.add_argument("--timing-cache", default=None, help="timing cache file: read if present, written after the build")
    sp.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson AGX/NX)")
    sp.add_argument("--gpu-fallback", action="store_true", help="with --dla-core: run layers DLA cannot on the GPU")

    sp = sub.add_parser("compare", help="bench or tune runs from several devices in one table and one plot")
    sp.add_argument("runs", nargs="+", help="JSON files written by `bench --json` or `tune --json`")
    sp.add_argument("--markdown", action="store_true", help="a Markdown table")
    sp.add_argument("--plot", dest="plot_path", default=None, help="PNG: latency, images/s (and images/s per watt) per batch size")

    sub.add_parser("backends", help="which backends are usable here, and why not the others")

    sp = sub.add_parser("keygen", help="write an Ed25519 key pair for signing bundles: NAME.pem (private, 0600) and NAME.pub.pem",
                        epilog="Sign with `edgeconv export --sign-key NAME.pem`; devices check with --public-key NAME.pub.pem. "
                               "Needs pip install 'edgeconv-runtime[sign]'.")
    sp.add_argument("name", metavar="NAME", help="path prefix of the two key files")
    sp.add_argument("--force", action="store_true", help="replace an existing key pair")
    return p


def _check_predict(args) -> None:
    """One-line refusals before a model is loaded."""
    if args.images and args.source:
        raise EdgeconvError("predict takes image files or --source, not both")
    if not args.images and not args.source:
        raise EdgeconvError("predict needs image files or --source SRC (a video file, rtsp://..., /dev/videoN or csi://N)")
    if not args.source and (args.every or args.max_frames):
        raise EdgeconvError("--every and --max-frames apply to --source only")
    if args.source:
        from .stream import import_cv2

        import_cv2()  # the install hint now, not after loading the model


def _predict_stream(model, args) -> int:
    from .stream import FRAME_HEADER, SourceEndedEarly, format_frame, format_summary, stop_on_sigint

    stream = model.stream(args.source, every=args.every or 1, max_frames=args.max_frames, batch=args.batch or 1, top_k=args.top_k)
    with stream, stop_on_sigint(stream):
        if not args.json:
            print(FRAME_HEADER, flush=True)
        try:
            for p in stream:
                print(json.dumps(p.to_dict()) if args.json else format_frame(p), flush=True)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the stream's loop
            stream.interrupted = True
        except SourceEndedEarly:  # a truncated file, a stalled stream: the frames above stand, the summary says so
            pass
        summary = stream.summary()
    print(json.dumps({"summary": summary}) if args.json else format_summary(summary), flush=True)
    if summary["interrupted"]:
        return 130
    if summary["problem"]:
        print(f"error: {summary['problem']}", file=sys.stderr, flush=True)
        return 1
    return 0


def _trust_key(args) -> None:
    """--public-key: every bundle this command opens (Model.load, serve, bench, stream) must be signed by it."""
    from pathlib import Path

    from .signing import set_trusted_key

    if not Path(args.bundle).is_dir():
        raise EdgeconvError(f"--public-key checks a bundle's signature, and {args.bundle} is not a bundle directory; pass the bundle")
    set_trusted_key(args.public_key)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """parse_args, but an unknown option is reported by its subcommand (`usage: edgeconv bench ...`), with the option it
    may have been meant as: options are never abbreviated."""
    args, extra = parser.parse_known_args(argv)
    if args.command == "predict" and extra:
        # `predict BUNDLE --json a.png b.png`: argparse gives the optional images positional its empty match at
        # BUNDLE, so images after options come back unparsed; they are still images
        images = [x for x in extra if not x.startswith("-") or x == "-"]
        if images and len(images) == len(extra):
            args.images = list(args.images or []) + images
            extra = []
    if extra:
        sp = parser.commands[args.command]
        known = [o for a in sp._actions for o in a.option_strings]
        meant = sorted({o for x in extra if x.startswith("--") for o in known if o.startswith(x.split("=")[0])})
        hint = f" (options are not abbreviated: did you mean {' or '.join(meant)}?)" if meant else ""
        sp.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def run(argv: Optional[Sequence[str]] = None, prog: str = "edgeconv-runtime") -> int:
    args = _parse(build_parser(prog), argv)
    if getattr(args, "max_pixels", None) is not None:
        from .preprocess import set_max_pixels

        set_max_pixels(args.max_pixels)  # the one decoder's cap, for every image this command decodes
    if args.command == "predict":
        _check_predict(args)
    if getattr(args, "public_key", None):
        _trust_key(args)
    if args.command == "keygen":
        from .signing import keygen

        private, public, kid = keygen(args.name, force=args.force)
        print(f"wrote {private} (private: sign with `edgeconv export --sign-key {private}`; keep it secret) and {public} "
              f"(public: `--public-key {public}` on the device); key id {kid}")
        return 0
    if args.command == "backends":
        from .backends import available_backends

        for name, (ok, why) in available_backends().items():
            print(f"{name:<22} {'yes' if ok else 'no':<4} {why}")
        return 0
    if args.command == "compare":
        from .compare import compare

        print(compare(args.runs, args.markdown, args.plot_path))
        return 0
    if args.command == "build-engine":
        from .engine import EngineOptions, build_engines, parse_batch

        opts = EngineOptions(tuple(args.precision), parse_batch(args.batch), args.workspace_mb, args.timing_cache, args.dla_core,
                             args.gpu_fallback)
        built = build_engines(args.bundle, opts)
        print(f"added {len(built)} engine(s) to {args.bundle}: {', '.join(a.file for a in built)}")
        return 0
    if args.command == "bench":
        if args.plot_path:
            from .compare import require_matplotlib

            require_matplotlib()  # refused before minutes of measuring, not after
        from .bench import BenchConfig, format_table, run_bench, write_outputs

        if args.iterations is None and args.duration is None:
            args.duration = 2.0
        precisions = args.precision or ([None] if args.backend == ["auto"] and not args.no_profile else ["fp32"])
        cfg = BenchConfig(args.bundle, args.backend, precisions, args.batch_sizes, args.warmup, args.iterations, args.duration,
                          args.threads, args.data, not args.no_e2e, shape=tuple(args.shape) if args.shape else None,
                          profile=not args.no_profile)
        result = run_bench(cfg)
        write_outputs(result, args.json_path, args.csv_path, args.plot_path)
        print(format_table(result))
        return 0 if result["rows"] else 1

    if args.command == "tune":
        from .manifest import RUNTIME_PRECISIONS as known
        from .tune import TuneConfig, format_tune_table, print_progress, run_tune

        bad = [p for p in (args.precision or []) if p not in known]
        if bad:
            raise EdgeconvError(f"unknown precision {bad[0]!r}; use one of {', '.join(known)}")
        cfg = TuneConfig(args.bundle, args.data, args.max_drop, args.objective, args.batch_sizes, args.budget_s, args.json_path,
                         not args.no_write, args.sign_key, args.max_images, args.rounds, backends=args.backend, precisions=args.precision,
                         progress=print_progress)
        import signal

        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops it even where SIGINT came in ignored (a background job)
        try:
            result = run_tune(cfg)
        except KeyboardInterrupt:
            print("tune: interrupted; nothing written", file=sys.stderr)
            return 130
        print(format_tune_table(result))
        return 0 if result["chosen"] else 1

    if args.command == "serve":
        from .serve import ServeConfig, run_server

        run_server(ServeConfig(args.bundle, args.host, args.port, args.backend, args.precision, args.max_batch, args.max_delay_ms,
                               args.max_queue, int(args.max_body_mb * 1024 * 1024), args.timeout_s, args.workers, args.threads,
                               body_timeout_s=args.body_timeout_s, header_timeout_s=args.header_timeout_s,
                               max_header_bytes=int(args.max_header_kb * 1024), max_json_bytes=int(args.max_json_mb * 1024 * 1024),
                               max_inflight_body_bytes=int(args.max_inflight_body_mb * 1024 * 1024), admit_wait_s=args.admit_wait_ms / 1000.0,
                               profile=not args.no_profile))
        return 0
    from .model import Model

    model = Model.load(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads, profile=not args.no_profile)
    if args.command == "predict":
        if model.info.get("note"):
            print(f"note: {model.info['note']}", file=sys.stderr)
        if args.source:
            return _predict_stream(model, args)
        preds = model.predict(args.images, top_k=args.top_k, batch_size=args.batch or 32)
        if args.json:
            print(json.dumps([p.to_dict() for p in preds], indent=2))
        else:
            for p in preds:
                tops = "  ".join(f"{l} {pr:.4f}" for l, pr in zip(p.labels, p.probabilities))
                print(f"{p.source}: {tops}")
        return 0
    if args.command == "evaluate":
        r = model.evaluate(args.image_dir)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print(f"accuracy {r['accuracy']:.4f} on {r['n']} images ({model.backend_name}, {model.precision})")
            for c, v in r["per_class"].items():
                print(f"  {c:<20} {v['accuracy'] if v['accuracy'] is not None else float('nan'):.4f}  n={v['n']}")
        return 0
    if args.command == "verify":
        r = model.verify()
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            status = "OK" if r["ok"] else "FAILED"
            pre = f", preprocessing max|diff| {r['preprocess_max_abs_diff']:.2e}" if "preprocess_max_abs_diff" in r else ""
            print(f"verify {status}: {r['backend']} {r['precision']} on {r['n']} reference inputs: max|diff| {r['max_abs_diff']:.3e}, "
                  f"min cosine {r['cosine_min']:.6f}, top-1 agreement {r['top1_agreement']:.3f}{pre}")
            for problem in r["problems"]:
                print(f"  {problem}")
        return 0 if r["ok"] else 1
    return 2


def main(argv: Optional[Sequence[str]] = None, prog: str = "edgeconv-runtime") -> None:
    try:
        code = run(argv, prog)
    except EdgeconvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 141
    sys.exit(code)


if __name__ == "__main__":
    main()
