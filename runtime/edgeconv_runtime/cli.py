"""``edgeconv-runtime``: predict, evaluate, verify, bench, backends. argparse only: no extra dependencies."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import EdgeconvError


def _ints(s: str) -> list:
    try:
        vals = [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of whole numbers, got {s!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be whole numbers >= 1, got {s!r}")
    return vals


def _list(s: str) -> list:
    return [v.strip() for v in s.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeconv-runtime", description="Run edgeconv bundles without PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, precision_default=None):
        sp.add_argument("bundle", help="bundle directory (or a .onnx / .plan file)")
        sp.add_argument("--backend", default="auto", help="auto, onnxruntime-cpu, onnxruntime-cuda, onnxruntime-tensorrt, tensorrt")
        sp.add_argument("--precision", default=precision_default, choices=["fp32", "fp16", "int8"])
        sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")

    sp = sub.add_parser("predict", help="top-k classes for images")
    common(sp)
    sp.add_argument("images", nargs="+")
    sp.add_argument("--top-k", type=int, default=5)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("evaluate", help="accuracy on a folder of class sub-folders")
    common(sp)
    sp.add_argument("image_dir")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("verify", help="re-run the bundle's reference inputs on this device")
    common(sp)
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("bench", help="latency/throughput per backend x precision x batch size")
    sp.add_argument("bundle")
    sp.add_argument("--backend", type=_list, default=["auto"], help="comma list")
    sp.add_argument("--precision", type=_list, default=["fp32"], help="comma list of fp32, fp16, int8")
    sp.add_argument("--batch-sizes", type=_ints, default=[1, 8, 32])
    sp.add_argument("--warmup", type=int, default=10)
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--iterations", type=int, default=None)
    g.add_argument("--duration", type=float, default=None, help="seconds per measurement (default 2)")
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--data", default=None, help="class-folder images: report accuracy beside speed")
    sp.add_argument("--no-e2e", action="store_true", help="skip end-to-end (JPEG bytes -> label) timing")
    sp.add_argument("--json", dest="json_path", default=None)
    sp.add_argument("--csv", dest="csv_path", default=None)
    sp.add_argument("--plot", dest="plot_path", default=None)

    sp = sub.add_parser("serve", help="HTTP inference server with dynamic batching")
    sp.add_argument("bundle")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default; another address is an explicit choice)")
    sp.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    sp.add_argument("--backend", default="auto")
    sp.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"])
    sp.add_argument("--max-batch", type=int, default=32, help="1 turns dynamic batching off")
    sp.add_argument("--max-delay-ms", type=float, default=5.0)
    sp.add_argument("--max-queue", type=int, default=256, help="images waiting; beyond it requests get 503")
    sp.add_argument("--max-body-mb", type=float, default=10.0)
    sp.add_argument("--timeout-s", type=float, default=10.0, help="per-request inference timeout (504)")
    sp.add_argument("--workers", type=int, default=2, help="decode/preprocess threads")
    sp.add_argument("--threads", type=int, default=None, help="inference threads")

    sub.add_parser("backends", help="which backends are usable here, and why not the others")
    return p


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        from .backends import available_backends

        for name, (ok, why) in available_backends().items():
            print(f"{name:<22} {'yes' if ok else 'no':<4} {why}")
        return 0
    if args.command == "bench":
        from .bench import BenchConfig, format_table, run_bench, write_outputs

        if args.iterations is None and args.duration is None:
            args.duration = 2.0
        cfg = BenchConfig(args.bundle, args.backend, args.precision, args.batch_sizes, args.warmup, args.iterations, args.duration,
                          args.threads, args.data, not args.no_e2e)
        result = run_bench(cfg)
        write_outputs(result, args.json_path, args.csv_path, args.plot_path)
        print(format_table(result))
        return 0 if result["rows"] else 1

    if args.command == "serve":
        from .serve import ServeConfig, run_server

        run_server(ServeConfig(args.bundle, args.host, args.port, args.backend, args.precision, args.max_batch, args.max_delay_ms,
                               args.max_queue, int(args.max_body_mb * 1024 * 1024), args.timeout_s, args.workers, args.threads))
        return 0
    from .model import Model

    model = Model.load(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads)
    if args.command == "predict":
        preds = model.predict(args.images, top_k=args.top_k)
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        code = run(argv)
    except EdgeconvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
