"""`make mutants`: mutation testing of the modules that hold our gates and guarantees (outside CI).

Each mutant is one small change to one function (a comparison flipped, `and`/`or` swapped, a condition negated, a
constant moved, an arithmetic operator swapped, a raise or a call statement removed), made in a copy of the tree; a
target may also name a module-level constant table (parity.TOLERANCES), whose numbers are each moved both ways (x2, /2);
the module's own tests then run against it (`pytest -x`, with a timeout). A mutant is killed when they fail.
Writes benchmarks/results/mutation.json: per module, mutants tried, killed, survived, and each survivor
(file:line, the change) with the reason it may stay (an equivalent mutant) or "UNEXPLAINED".

    python scripts/mutants.py [--module NAME ...] [--limit N] [--out benchmarks/results/mutation.json]

The working tree is never touched: the copy lives in a temp folder (beside a link to ../shared) and is imported
first through PYTHONPATH. The trained fixtures (tests/conftest.py) are built once by the unmutated code
(EDGECONV_TEST_FIXTURES) and reused by every mutant, so a mutant pays only for its tests.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    name: str
    file: str  # relative to the repo root
    functions: tuple  # "func" or "Class.method": only these are mutated
    tests: tuple  # pytest arguments
    equivalent: dict = field(default_factory=dict)  # "function: change" -> why the mutant cannot be told apart


GUARANTEES = "tests/test_guarantees.py"
EPSILON = ("equivalent: the 1e-12 only keeps an all-zero logit row from 0/0 (its numerator is 0 either way); beside norms of "
           "real logits its sign or size moves a cosine by ~1e-12, far below the tightest limit (1 - 0.99999)")
TRUST = ("tests/test_bundle_paths.py", "tests/test_bundle_contract.py", "tests/test_bundle_trust.py")
TARGETS = [  # tests: one -k at most (pytest keeps only the last)
    Target("parity", "runtime/edgeconv_runtime/parity.py", ("parity_report", "tolerance_problems", "device_tolerance"),
           ("tests/test_parity_table.py", "tests/test_bundle_contract.py", "-k", "parity or tolerance or drift"),
           {"parity_report: Add -> Sub: np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12 => "
            "np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) - 1e-12": EPSILON,
            "parity_report: 1e-12 -> 2e-12: 1e-12 => 2e-12": EPSILON}),
    Target("parity.TOLERANCES", "runtime/edgeconv_runtime/parity.py", ("TOLERANCES", "BACKEND_OVERRIDES", "PREPROCESS_MAX_ABS_DIFF"),
           ("tests/test_mutation_kills_tolerances.py", "tests/test_parity_table.py")),
    Target("export bundle", "export/edgeconv_export/bundle.py",
           ("ExportOptions.validate", "_fp32_agrees", "_budget", "_drop_problem", "_gate", "_gate_reference", "covered_files",
            "_check_request", "_int8_refusal"),
           ("tests/test_mutation_kills_export_bundle.py", GUARANTEES, "-k", "mutation_kills or accuracy_drop or recorded_accuracy")),
    Target("preprocess", "runtime/edgeconv_runtime/preprocess.py",
           ("Preprocess.__post_init__", "set_max_pixels", "open_image", "draft_size", "convert_mode", "resize_image", "_letterbox",
            "normalize", "check_channel_order", "bgr_to_rgb", "preprocess_images"),
           ("tests/test_decoder.py", "tests/test_mutation_kills_preprocess.py", "-k", "not cli_names and not models_recorded"),
           {"open_image: Or -> And: w < 1 or h < 1 => w < 1 and h < 1": "equivalent with the Pillow we ship: no accepted format "
            "opens with an empty size (PNG, BMP and JPEG headers forged to 0 x 5 and 5 x 0 are UnidentifiedImageError, the "
            "'header is corrupt' error; a lossy WebP forged so is an OSError at open, 'cannot decode image'), so the check is a guard for a future Pillow and neither form of it is reached; the "
            "1-pixel edge (h < 1 => h <= 1) is killed",
            "convert_mode: 255 -> 256: 255 => 256": "equivalent: Pillow clamps the fill colour of an 8-bit image, so "
            "Image.new('RGB', size, (256, 256, 256)) is the same (255, 255, 255) white (checked with Pillow 13.0.0); the "
            "white itself is pinned by test_mutation_kills_preprocess (a transparent pixel becomes exactly 255, 255, 255)",
            "open_image: Mult -> Div: DRAFT_MARGIN * 2 => DRAFT_MARGIN / 2": "equivalent with Pillow's draft(): asked for "
            "DRAFT_MARGIN x the size needed, it picks scale min(w // ask_w, h // ask_h) and reduces only when that is >= 2 in both "
            "directions, which is this same DRAFT_MARGIN * 2 x threshold; below it draft() keeps scale 1, a full decode with "
            "identical pixels (checked: 252 x 256, 256 x 252, 255 x 1000 and 130 x 130 JPEGs decode the same with and without "
            "it); the threshold itself is pinned by test_jpeg_draft_starts_at_twice_the_margin_and_keeps_both_sides",
            "open_image: Mult -> Div: DRAFT_MARGIN * 2 * need[1] => DRAFT_MARGIN * 2 / need[1]": "equivalent with Pillow's draft() "
            "for the same reason: the height test becomes always true, but draft() still reduces only when the height is at least "
            "DRAFT_MARGIN * 2 x the height needed, so below that it decodes at scale 1 (identical pixels)"}),
    Target("v2", "runtime/edgeconv_runtime/v2.py",
           ("model_name", "_bytes_elements", "_flatten", "Protocol.check_model", "Protocol.metadata", "Protocol.json_length", "Protocol.parse",
            "Protocol.plan", "Protocol._binary_part", "Protocol._images", "Protocol._tensor_source", "Protocol.tensor", "Protocol._outputs",
            "Protocol.response"),
           ("tests/test_mutation_kills_v2.py",),
           {"Protocol.response: And -> Or: name == 'probabilities' and probs is None => name == 'probabilities' or probs is None":
            "equivalent for every answer: `or` only computes the same softmax of the same logits earlier (for a 'logits' output, "
            "where it is not used) or once more (for 'probabilities' after 'labels' made it); the values sent are identical"}),
    Target("cli", "runtime/edgeconv_runtime/cli.py",
           ("_DefaultsShown._get_help_string", "_ints", "_positive", "_list", "_check_predict", "_trust_key", "_parse", "run", "main"),
           ("tests/test_mutation_kills_cli.py",),
           {"run: returns None: return 2 => return None": "equivalent: unreachable; argparse accepts only the nine subcommands "
            "(required=True) and run() returns from each of them before this last line",
            "run: 2 -> 3: 2 => 3": "equivalent: the same unreachable last line of run() (every subcommand returns earlier)"}),
    Target("model", "runtime/edgeconv_runtime/model.py",
           ("_is_single", "Model.load", "Model.run", "Model._bad_input", "Model.predict", "Model.evaluate", "Model.verify"),
           ("tests/test_runtime.py", "tests/test_plain_onnx.py", "tests/test_mutation_kills_model.py", "-k",
            "not cli and not never_imports and not bench")),
    Target("single ONNX files", "runtime/edgeconv_runtime/plain.py", ("precision_of", "plain_bundle", "onnx_file_bundle"),
           ("tests/test_runtime.py", "tests/test_plain_onnx.py", "tests/test_mutation_kills_model.py", "-k",
            "not cli and not never_imports and not bench")),
    Target("backend selection", "runtime/edgeconv_runtime/backends/select.py",
           ("select_backend", "_attempt", "cpu_int8_variant", "_int8_mismatch", "graph_mismatch", "artifact_kind", "missing_artifact"),
           ("tests/test_runtime.py", "tests/test_plain_onnx.py", "tests/test_mutation_kills_model.py", "tests/test_mutation_kills_select.py",
            "tests/test_backends.py", "-k",
            "not cli and not never_imports and not bench"),
           {"_attempt: call statement removed: bundle.wait_checked() => pass": "equivalent: this branch is reached only after "
            "_int8_mismatch read the reference tensors through Bundle.path(), which joins every deferred sha256 comparison "
            "first (a mismatch raises there), so the second join finds nothing pending"}),
    Target("importer", "export/edgeconv_export/importer.py",
           ("ImportRequest.__post_init__", "GraphInfo.channels", "GraphInfo.spatial", "load_source", "_open_unknown_dims", "_dims",
            "_real_inputs", "_layout", "inspect_graph", "_softmax_axis", "as_logits", "to_source_layout", "source_outputs", "read_labels",
            "parse_floats", "parse_size", "_size", "_check_size", "build_preprocess", "default_precisions", "check_request"),
           ("tests/test_mutation_kills_importer.py",)),
    Target("manifest", "runtime/edgeconv_runtime/manifest.py", ("is_sha256", "check_relative_path", "resolve_inside", "read_manifest"), TRUST),
    Target("bundle hashing", "runtime/edgeconv_runtime/bundle.py", ("Bundle.path", "Bundle.check_file", "read_bundle"), TRUST),
    Target("checkpoint", "edgeconv/checkpoint.py", ("weights_sha256", "resolve_checkpoint", "load_checkpoint", "model_from_checkpoint"),
           ("tests/test_checkpoint_integrity.py", GUARANTEES, "-k", "checkpoint or weights_hash"),
           {"model_from_checkpoint: False -> True: False => True": "equivalent for the result: load_state_dict replaces every tensor "
            "right after, so the network ends with the checkpoint's weights either way; reached only for pretrained backbones, where "
            "it would also fetch ImageNet weights first (offline: an error instead of a load)"}),
    Target("training loop", "edgeconv/training/loop.py", ("fit", "Fitted.resumed", "_validate"),
           (GUARANTEES, "-k", "best_epochs_weights or early_stopping or resume_continues")),
    Target("training resume", "edgeconv/training/scratch.py", ("_restore",), (GUARANTEES, "-k", "resume_continues or best_epochs_weights"),
           {"_restore: And -> Or: scheduler is not None and st.get('scheduler') => scheduler is not None or st.get('scheduler')":
            "equivalent: the resumed run's config comes from the state itself, so a scheduler exists exactly when the state holds "
            "one (--lr-schedule none: both None; cosine/onecycle: both set); `or` decides the same in every state train() writes"}),
    Target("training run dir", "edgeconv/training/rundir.py", ("prepare_out", "save_state", "load_state"),
           ("tests/test_scale.py", GUARANTEES, "-k", "corrupt or disk_full or run_directory or resume_continues")),
    Target("serve admission", "runtime/edgeconv_runtime/admission.py",
           ("Batcher.admit", "Batcher.release", "Admission._reserve_body", "Admission.infer", "Admission.read_body"),
           ("tests/test_admission.py", "tests/test_serve_limits.py", "tests/test_readme_promises.py", "tests/test_serve.py", "-k",
            "admission or test_serve_limits or 413 or 503 or readyz or overload"),
           {"Batcher.admit: raise removed: raise QueueFull() => pass": "equivalent where it survives (the wait_s <= 0 branch): "
            "without the raise the request joins the line with a 0 s wait, wait_for times out at once and the same QueueFull is "
            "raised with the line left as it was (the raise for more images than the queue holds is killed by test_admission)",
            "Batcher.release: True -> False: True => False": "equivalent: the granted waiter's future carries no value that is "
            "read (admit() only awaits it); True or False, the waiter is admitted the same way"}),
    Target("fileio", "runtime/edgeconv_runtime/fileio.py", ("atomic_write_bytes", "atomic_directory"),
           ("tests/test_fileio.py", "tests/test_export_swap.py", "tests/test_export.py", "tests/test_scale.py", "-k",
            "fileio or (not real_export and not kill_9 and (swap or force or stale or exchange or failed or disk_full or corrupt or kill))"),
           {"atomic_write_bytes: Or -> And: exc.strerror or exc => exc.strerror and exc": "equivalent for behaviour: the one-line "
            "error keeps its type, cause and 'No space left on device' text; `and` prints str(exc) (errno and file name) instead of "
            "the bare strerror",
            "atomic_directory: call statement removed: _fsync_dir(final.parent) => pass": "equivalent short of a power loss: the "
            "directory fsync makes the rename durable across a crash of the machine; a process kill (what tests can do) already "
            "sees the rename, so only pulling the plug could tell the two apart",
            "atomic_directory: True -> False: True => False": "equivalent unless the clean-up itself fails: ignore_errors only "
            "decides whether a temp or old folder that cannot be removed raises; the bundle in place is already the right one"}),
]

CMP_SWAP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
            ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
BIN_SWAP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


def _functions(tree: ast.Module, wanted: tuple) -> list:
    """The (qualified name, node) of each wanted function or method ("*": every function in the module), and of each
    wanted module-level constant (a NAME = ... assignment: a table of limits, whose numbers are then mutated)."""
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append((node.name, node))
        elif isinstance(node, ast.ClassDef):
            out += [(f"{node.name}.{m.name}", m) for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out += [(t.id, node) for t in targets if isinstance(t, ast.Name) and t.id in wanted]
    return [(n, f) for n, f in out if "*" in wanted or n in wanted]


def _skipped(node: ast.AST, parent: ast.AST) -> bool:
    """Not worth a mutant: strings, docstrings, logging calls, and numbers that only shape a message (slices, f-strings)."""
    if isinstance(node, ast.Constant) and (isinstance(node.value, str) or isinstance(parent, (ast.Slice, ast.FormattedValue))):
        return True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return True
    call = node.value if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) else None
    return bool(call and isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name) and call.func.value.id in ("log", "logging", "warnings"))


def _mutations(node: ast.AST, table: bool = False):
    """Yield (description, mutate) for ``node``; mutate() changes it in place (on a copy of the tree). In a constant
    table (``table``) a number is moved both ways (x2 and /2): a limit loosened as well as tightened."""
    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMP_SWAP:
                new = CMP_SWAP[type(op)]
                yield f"{type(op).__name__} -> {new.__name__}", lambda n, i=i, new=new: n.ops.__setitem__(i, new())
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        yield f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield "not x -> x", "unwrap"
    elif isinstance(node, ast.BinOp) and type(node.op) in BIN_SWAP:
        new = BIN_SWAP[type(node.op)]
        yield f"{type(node.op).__name__} -> {new.__name__}", lambda n, new=new: setattr(n, "op", new())
    elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
        v = node.value
        new = (v + 1) if isinstance(v, int) else (v * 2 if v else 1.0)
        yield f"{v!r} -> {new!r}", lambda n, new=new: setattr(n, "value", new)
        if table and isinstance(v, float) and v:
            yield f"{v!r} -> {v / 2!r}", lambda n, new=v / 2: setattr(n, "value", new)
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield f"{node.value} -> {not node.value}", lambda n: setattr(n, "value", not n.value)
    if isinstance(node, (ast.If, ast.While)):
        yield "condition negated", lambda n: setattr(n, "test", ast.UnaryOp(ast.Not(), n.test))
    elif isinstance(node, ast.Raise):
        yield "raise removed", "pass"
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield "call statement removed", "pass"
    elif isinstance(node, ast.Return) and node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None):
        yield "returns None", lambda n: setattr(n, "value", ast.Constant(None))


class _Replace(ast.NodeTransformer):
    """Replaces the node numbered ``target_id`` by ``pass`` or (``unwrap``) by the operand of its ``not``."""

    def __init__(self, target_id: int, how: str):
        self.target_id, self.how = target_id, how

    def visit(self, node):
        if getattr(node, "_mid", None) == self.target_id:
            return node.operand if self.how == "unwrap" else ast.Pass()
        return self.generic_visit(node)


def mutants(source: str, functions: tuple) -> list:
    """Every mutant of ``functions`` in ``source``: (line, description, original code, mutated module source)."""
    tree = ast.parse(source)
    parents = {}
    for i, node in enumerate(ast.walk(tree)):
        node._mid = i
        for child in ast.iter_child_nodes(node):
            parents[id(child)] = node
    out = []
    for qual, fn in _functions(tree, functions):
        for node in ast.walk(fn):
            if node is fn or _skipped(node, parents.get(id(node))):
                continue
            for desc, how in _mutations(node, table=isinstance(fn, (ast.Assign, ast.AnnAssign))):
                mutated = copy.deepcopy(tree)
                target = next(n for n in ast.walk(mutated) if getattr(n, "_mid", None) == node._mid)
                before = ast.unparse(target).splitlines()[0][:120]
                if callable(how):
                    how(target)
                    after = ast.unparse(target).splitlines()[0][:120]
                else:
                    mutated = _Replace(node._mid, how).visit(mutated)
                    after = "pass" if how == "pass" else ast.unparse(target.operand).splitlines()[0][:120]
                ast.fix_missing_locations(mutated)
                out.append({"function": qual, "line": node.lineno, "change": f"{desc}: {before} => {after}",
                            "source": ast.unparse(mutated)})
    return out


def prepare_copy(tmp: Path) -> Path:
    """A copy of the tree (no .venv, .git, runs) at tmp/repo, with tmp/shared pointing at ../shared."""
    repo = tmp / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache"))
    (tmp / "shared").symlink_to(ROOT.parent / "shared")
    return repo


def run_tests(repo: Path, tests: tuple, env: dict, timeout: float) -> tuple:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    t0 = time.perf_counter()
    # its own process group: on a timeout (a mutant that hangs) pytest and every child it started are killed together
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc, tail = proc.returncode, out.strip().splitlines()[-1:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ["timed out"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return rc, time.perf_counter() - t0, (tail or [""])[0]


def run_target(t: Target, repo: Path, env: dict, limit: int | None, previous: dict | None = None) -> dict:
    """Every mutant of ``t`` against its tests; with ``previous`` (this module's last record) only its survivors,
    again (tests added since may kill them), and the record is updated."""
    path = repo / t.file
    original = path.read_text()
    found = mutants(original, t.functions)
    if previous is not None:
        wanted = {(s["where"], s["function"], s["change"]) for s in previous.get("survivors", [])}
        found = [m for m in found if (f"{t.file}:{m['line']}", m["function"], m["change"]) in wanted]
    elif limit and len(found) > limit:  # evenly spread over the module's functions, the same ones every run
        total = len(found)
        found = [found[i * total // limit] for i in range(limit)]
    path.write_text(ast.unparse(ast.parse(original)))  # the baseline is the unparsed source too: same formatting as mutants
    rc, base_s, tail = run_tests(repo, t.tests, env, timeout=3600)
    path.write_text(original)
    if rc != 0:
        return {"module": t.name, "file": t.file, "error": f"tests fail without any mutant: {tail}"}
    timeout = max(60.0, 3 * base_s + 30)
    killed, survivors = [], []
    print(f"{t.name}: {len(found)} mutants, tests take {base_s:.0f} s", flush=True)
    for i, m in enumerate(found, 1):
        path.write_text(m["source"])
        try:
            rc, took, tail = run_tests(repo, t.tests, env, timeout)
        finally:
            path.write_text(original)
        record = {"where": f"{t.file}:{m['line']}", "function": m["function"], "change": m["change"]}
        if rc != 0:
            killed.append(record)
        else:
            survivors.append({**record, "equivalent": t.equivalent.get(f"{m['function']}: {m['change']}", "UNEXPLAINED")})
        print(f"  [{i}/{len(found)}] {'killed' if rc != 0 else 'SURVIVED'} {t.file}:{m['line']} {m['change']} ({took:.0f} s)", flush=True)
    tried = len(found) if previous is None else previous["tried"]
    generated = len(mutants(original, t.functions)) if previous is None else previous.get("generated", tried)
    n_killed = tried - len(survivors)
    equivalent = sum(1 for s in survivors if s["equivalent"].startswith("equivalent"))
    out = {"module": t.name, "file": t.file, "functions": list(t.functions), "tests": " ".join(t.tests), "generated": generated, "tried": tried, "killed": n_killed,
           "survived": len(survivors), "killed_pct": round(100.0 * n_killed / tried, 1) if tried else None,
           "equivalent": equivalent, "killed_pct_of_non_equivalent": round(100.0 * n_killed / (tried - equivalent), 1) if tried > equivalent else None,
           "test_seconds": round(base_s, 1), "survivors": survivors}
    if previous is not None:
        out["killed_on_rerun"] = previous.get("killed_on_rerun", []) + killed  # survivors of the first run that new tests kill
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--module", action="append", help="only these targets (by name); default: all")
    ap.add_argument("--limit", type=int, help="at most N mutants per module, evenly spread (for a quicker run)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mutation.json"))
    ap.add_argument("--list", action="store_true", help="only count the mutants per module")
    ap.add_argument("--survivors", action="store_true", help="rerun only the survivors recorded in --out (after adding tests)")
    args = ap.parse_args(argv)
    targets = [t for t in TARGETS if not args.module or t.name in args.module]
    if args.list:
        for t in targets:
            found = mutants((ROOT / t.file).read_text(), t.functions) if (ROOT / t.file).exists() else []
            print(f"{t.name}: {len(found)} mutants in {t.file}")
        return 0
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="edgeconv-mutants-") as tmp:
        repo = prepare_copy(Path(tmp))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(repo / p) for p in ("", "runtime", "export")),
                   EDGECONV_TEST_FIXTURES=os.environ.get("EDGECONV_TEST_FIXTURES") or str(Path(tmp) / "fixtures"))
        for t in targets:
            previous = None
            if args.survivors:
                previous = next((m for m in _records(Path(args.out)) if m["module"] == t.name and "survivors" in m), None)
                if previous is None:
                    continue
            r = run_target(t, repo, env, args.limit, previous) if (repo / t.file).exists() else {"module": t.name, "file": t.file, "error": "file not found"}
            _save(Path(args.out), r, time.time() - t0)  # after each module: a long run that is stopped keeps what it measured
            print(f"{r['module']}: " + (r.get("error") or f"{r['killed']}/{r['tried']} killed ({r['killed_pct']} %), {r['survived']} survived"))
    return 0


def _records(path: Path) -> list:
    return json.loads(path.read_text()).get("modules", []) if path.exists() else []


def _save(path: Path, record: dict, seconds: float) -> None:
    """Put ``record`` into ``path`` in place of that module's earlier one (the others are kept, in TARGETS order)."""
    order = [t.name for t in TARGETS]
    merged = [m for m in _records(path) if m["module"] != record["module"]] + [record]
    out = {"tool": "scripts/mutants.py", "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "last_run_seconds": round(seconds),
           "goal": ">= 90 % killed per module; every survivor killed by a new test or explained as equivalent",
           "modules": sorted(merged, key=lambda m: order.index(m["module"]) if m["module"] in order else len(order))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
