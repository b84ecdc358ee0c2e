"""Reading bundles: the validated manifest, artifacts (hash-checked, inside the bundle), reference files."""
from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import EdgeconvError
from .fileio import sha256_file
from .manifest import (ENGINE_SUFFIXES, MANIFEST_NAME, REEXPORT, SIGNATURE_NAME, Artifact, Manifest, check_regular, hash_mismatch, read_manifest,
                       resolve_inside)
from .preprocess import Preprocess

# files a bundle may hold that the manifest does not list: written beside it for people (the runtime never reads them)
DOC_FILES = ("MODEL_CARD.md", "model_card.json", "curves.png")
# folders the runtime itself writes into a bundle: ONNX Runtime's TensorRT engine cache, build-engine's staging folder
CACHE_DIRS = (".trt_cache",)
STAGING_PREFIX = ".engines."
# (path, size, mtime, ctime, inode, device, expected sha256) of every file already hashed in this process: a file changed
# since (ctime moves on every write, and no user can set it back) is hashed again
_verified: set = set()
# The same stamps kept across processes, so a restart (serve, predict) does not hash 30 MB again: one empty file per
# stamp in a folder only this user can write ($EDGECONV_VERIFY_CACHE, default ~/.cache/edgeconv/verified; "off": none).
# A stamp is recorded only for a file last changed RACY_SECONDS before it was hashed, so a change made after (or during)
# the hash, even within one tick of a coarse file-system clock, gives the file a later ctime and another stamp.
VERIFY_CACHE_ENV = "EDGECONV_VERIFY_CACHE"
RACY_SECONDS = 2.0
_cache_dirs: dict = {}


def verify_cache_dir() -> Optional[Path]:
    """The cross-process folder of verified stamps, or None (turned off, or not private to this user)."""
    value = os.environ.get(VERIFY_CACHE_ENV, "")
    if value.lower() == "off":
        return None
    if value not in _cache_dirs:
        base = Path(value) if value else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeconv" / "verified"
        d = None
        try:
            base.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(base)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
                d = base  # a folder another user (or a symlink) could fill would vouch for nothing
        except (OSError, RuntimeError):  # no home, a read-only file system: hash every time
            d = None
        _cache_dirs[value] = d
    return _cache_dirs[value]


def _stamp_key(stamp: tuple) -> str:
    import hashlib

    return hashlib.sha256(repr(stamp).encode("utf-8", "surrogateescape")).hexdigest()


def _stamp(path: Path, st: os.stat_result, expected: str) -> tuple:
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, expected)


def _known(stamp: tuple) -> bool:
    """Whether this version of a file (its stamp) was hashed and matched already: in this process, or in an earlier
    one that recorded it in the verify cache."""
    if stamp in _verified:
        return True
    cache = verify_cache_dir()
    if cache is not None and os.path.isfile(cache / _stamp_key(stamp)):
        _verified.add(stamp)
        return True
    return False


def _atomic_temp(name: str) -> bool:
    """A manifest or signature being written this instant (fileio.atomic_write_bytes' temp file): never read."""
    return name.endswith(".tmp") and name.startswith((f".{MANIFEST_NAME}.", f".{SIGNATURE_NAME}."))

__all__ = ["ENGINE_SUFFIXES", "MANIFEST_NAME", "Bundle", "bundle_from_onnx_metadata", "read_bundle"]


@dataclass
class Bundle:
    root: Optional[Path]
    manifest: Manifest
    preprocess: Preprocess
    classes: List[str]
    check_hash: bool = True  # False (Model.load(check_hash=False)): files are read without comparing their sha256
    # read_bundle(defer_hashes=True): the sha256 of every listed file is being compared on background threads
    # (``wait_checked`` joins them and raises the first mismatch); None once joined, or when hashed at once
    _pending: Optional["_PendingHashes"] = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    def reference_tensors(self) -> Optional[tuple]:
        """(inputs as float32 NCHW, expected logits) that export recorded, or None where the manifest names none;
        one-line errors for files that are missing, unreadable or pickled, or whose shapes do not fit the model."""
        import numpy as np

        ref = self.manifest.reference
        if not ref or "inputs" not in ref or "outputs" not in ref:
            return None
        try:
            x = np.load(self.path(ref["inputs"]), allow_pickle=False)
            expected = np.load(self.path(ref["outputs"]), allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise EdgeconvError(f"bundle reference tensors are missing or unreadable ({str(exc).splitlines()[0][:120]}); copy the whole bundle") from exc
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.preprocess.input_shape) or expected.shape != (len(x), len(self.classes)):
            raise EdgeconvError(f"bundle reference tensors have shapes {x.shape} / {expected.shape}, which do not fit the model; re-export the bundle")
        return x.astype(np.float32), expected

    def path(self, rel: str, check_hash: bool = True) -> Path:
        """A file the manifest names, refused when it points outside the bundle, is no regular file, or differs from its sha256.

        Every file the manifest lists is hashed before it is handed out (once per file version: a changed
        size, mtime or ctime hashes it again); a file a read bundle does not list is refused.
        """
        path = resolve_inside(self.root, rel, f"{MANIFEST_NAME} in {self.root}")
        files = self.manifest.files
        if files is None:  # a bundle made in memory (a bare .onnx's metadata, a plain graph): nothing to check against
            return path
        expected = files.get(rel) or next((a.sha256 for a in self.manifest.artifacts if a.file == rel), None)
        if expected is None:
            raise EdgeconvError(f"{rel} in {self.root} is not listed in its manifest.json, so it cannot be trusted; {REEXPORT}")
        self.wait_checked()  # a file handed out to be read has been compared with its sha256
        if check_hash and self.check_hash:
            self.check_file(rel, path, expected)
        else:
            check_regular(path, rel, self.root)
        return path

    def check_file(self, rel: str, path: Path, expected: str) -> None:
        st = check_regular(path, rel, self.root)  # lstat: a symlink or a FIFO is refused before anything opens it
        stamp = _stamp(path, st, expected)
        if _known(stamp):
            return
        cache = verify_cache_dir()
        key = _stamp_key(stamp)
        started = time.time()
        try:
            digest = sha256_file(path)
        except OSError as exc:
            raise EdgeconvError(f"{rel} in {self.root} is not readable ({exc.strerror or exc}); copy the bundle again") from exc
        if digest != expected:
            raise hash_mismatch(rel, self.root)
        if len(_verified) > 100_000:
            _verified.clear()
        _verified.add(stamp)
        if cache is not None and st.st_ctime < started - RACY_SECONDS:
            try:
                os.close(os.open(cache / key, os.O_WRONLY | os.O_CREAT, 0o600))
            except OSError:
                pass

    def listed(self) -> dict:
        """{relative path: sha256} of every file the manifest covers: the artifacts and the ``files`` map."""
        out = dict(self.manifest.files or {})
        for a in self.manifest.artifacts:
            if out.setdefault(a.file, a.sha256) != a.sha256:
                raise EdgeconvError(f"{MANIFEST_NAME} in {self.root} gives {a.file} two different sha256; {REEXPORT}")
        return out

    def check_contents(self, defer: bool = False) -> None:
        """The whole bundle, as it is opened: every file the manifest lists is a regular file inside the bundle that
        matches its sha256 (only its presence and kind with ``check_hash`` False), whatever precision is asked; the
        reference and every artifact's external data are listed; nothing else is there but the people-facing
        documents and the runtime's own caches: no symlink, FIFO, device or unlisted file.

        ``defer``: everything but the sha256 comparisons is checked now; those run on background threads, beside
        whatever the caller does next (Model.load: start ONNX Runtime), until ``wait_checked`` joins them.
        """
        where = f"{MANIFEST_NAME} in {self.root}"
        if self.manifest.files is None:
            raise EdgeconvError(f"{where} has no 'files' map, so its reference files and external data cannot be checked; {REEXPORT}")
        listed = self.listed()
        ref = self.manifest.reference or {}
        wanted = [ref[k] for k in ("inputs", "outputs", "labels") if isinstance(ref.get(k), str)] + list(ref.get("images") or [])
        for a in self.manifest.artifacts:
            wanted += [rel for rel in (a.details.get("external_data") or [])]
        for rel in wanted:
            if not isinstance(rel, str) or rel not in listed:
                raise EdgeconvError(f"{where} names {str(rel)[:80]!r} but gives no sha256 for it; {REEXPORT}")
        paths = [(rel, resolve_inside(self.root, rel, where), expected) for rel, expected in listed.items()]
        stats = [check_regular(path, rel, self.root) for rel, path, _ in paths]  # every kind first: a FIFO or symlink is refused before any file is read
        if not (self.check_hash and defer):
            if self.check_hash:
                self._check_files(paths)
            self._check_nothing_else(set(listed))
            return
        try:
            self._check_nothing_else(set(listed))
        except EdgeconvError:
            self._check_files(paths)  # a file that fails its sha256 is the error, as when hashed at once
            raise
        # only the files not already verified (a restart: none) go to the threads
        todo = [(item, st.st_size) for item, st in zip(paths, stats)
                if not _known(_stamp(item[1], st, item[2]))]
        if todo:
            self._pending = _PendingHashes(self, [item for item, _ in todo], [size for _, size in todo])

    def wait_checked(self) -> None:
        """Join the deferred sha256 comparisons (read_bundle(defer_hashes=True)); raise the first mismatch in manifest
        order, on this call and every later one."""
        pending = self._pending
        if pending is not None:
            pending.result()
            self._pending = None

    def _check_files(self, paths: list) -> None:
        """Hash the files, the big ones on a few threads at once (hashlib releases the GIL); the first failure in
        manifest order is the error, whichever thread finished first."""
        def check(item):
            try:
                self.check_file(*item)
            except EdgeconvError as exc:
                return exc
            return None

        workers = min(4, os.cpu_count() or 1, len(paths))
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers, thread_name_prefix="edgeconv-hash") as pool:
                errors = list(pool.map(check, paths))
        else:
            errors = [check(item) for item in paths]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _check_nothing_else(self, listed: set) -> None:
        root = Path(self.root)
        for dirpath, dirnames, filenames in os.walk(root):  # never follows a symlinked folder
            here = Path(dirpath)
            top = here == root
            keep = []
            for d in dirnames:
                full = here / d
                if top and (d in CACHE_DIRS or d.startswith(STAGING_PREFIX)) and not full.is_symlink():
                    continue
                if full.is_symlink():
                    rel = full.relative_to(root).as_posix()
                    raise EdgeconvError(f"{rel} in {self.root} is a symlink; a bundle holds its own files: copy it with its files (cp -rL)")
                keep.append(d)
            dirnames[:] = keep
            for f in filenames:
                full = here / f
                rel = full.relative_to(root).as_posix()
                if rel in listed or (top and (f in (MANIFEST_NAME, SIGNATURE_NAME) or f in DOC_FILES or _atomic_temp(f))):
                    if top and f in DOC_FILES + (SIGNATURE_NAME,):
                        check_regular(full, rel, self.root)
                    continue
                st = os.lstat(full)
                if not stat.S_ISREG(st.st_mode):
                    check_regular(full, rel, self.root)  # raises: symlink, FIFO, socket, device
                raise EdgeconvError(f"{rel} in {self.root} is not listed in its manifest.json: a file the runtime might read "
                                    f"unchecked; remove it, or {REEXPORT}")

    def artifact(self, fmt: str, precision: str, check_hash: bool = True, variant: Optional[str] = None) -> Tuple[Path, Artifact]:
        """(path, record) of the artifact of ``fmt``/``precision``/``variant``; refuses a missing or altered file.

        ``variant`` None is the default artifact; "tensorrt" falls back to the default one when the
        bundle has no TensorRT-specific graph of that precision (only INT8 has one).
        """
        a = self.manifest.find(fmt, precision, variant)
        if a is None and variant not in (None, "default"):
            a = self.manifest.find(fmt, precision)
        if a is None:
            have = sorted({f"{x.format}/{x.precision}" + ("" if x.variant == "default" else f"/{x.variant}") for x in self.manifest.artifacts})
            raise EdgeconvError(f"bundle {self.root} has no {fmt} {precision} artifact (it has {', '.join(have) or 'none'}); "
                                f"export it with --precision {precision}")
        path = resolve_inside(self.root, a.file, f"{MANIFEST_NAME} in {self.root}")
        # deferred (Model.load): the graph (and its external data) is compared with its sha256 before it is handed to
        # a backend to parse, by a hash thread or here, whichever comes first; the other files' comparisons go on
        # beside the backend's start, and Model.load joins them before it returns a model
        pending = self._pending if check_hash and self.check_hash else None
        if check_hash and self.check_hash:
            if pending is None or not pending.wait_for(a.file):
                self.check_file(a.file, path, a.sha256)
        else:
            check_regular(path, a.file, self.root)
        if check_hash:
            for rel in a.details.get("external_data") or []:  # ONNX Runtime reads these beside the graph
                if not isinstance(rel, str) or rel not in (self.manifest.files or {}):
                    raise EdgeconvError(f"{a.file} in {self.root} has external data {rel!r} that manifest.json gives no sha256 for; re-export the bundle")
                if pending is None:
                    self.path(rel)
                elif not pending.wait_for(rel):  # verified already: its stamp is looked at again
                    self.check_file(rel, resolve_inside(self.root, rel, f"{MANIFEST_NAME} in {self.root}"), self.manifest.files[rel])
        return path, a

    def has(self, fmt: str, precision: str, variant: Optional[str] = None) -> bool:
        return self.manifest.find(fmt, precision, variant) is not None


def read_bundle(root, check_hash: bool = True, public_key=None, defer_hashes: bool = False) -> Bundle:
    """Open a bundle directory: its sealed manifest (signed by ``public_key``, or by the process's trusted key
    ``--public-key`` set, when there is one) and every file it lists, checked now (``Bundle.check_contents``).

    ``defer_hashes`` (Model.load): the files' sha256 are compared on background threads while the caller goes on;
    ``bundle.wait_checked()`` must be called (it raises the first mismatch) before the bundle's model is used.
    """
    from .signing import check_signature, trusted_key

    root = Path(root)
    manifest = read_manifest(root)
    key = public_key if public_key is not None else trusted_key()
    if key is not None:
        check_signature(root, manifest.digest, key)
    try:
        pre = Preprocess.from_dict(manifest.preprocess)
    except (TypeError, ValueError, KeyError) as exc:  # a mistyped number or list in the preprocess record
        detail = " ".join(str(exc).split())[:160]
        raise EdgeconvError(f"{root / MANIFEST_NAME} has an invalid 'preprocess' record ({type(exc).__name__}: {detail}); re-export the bundle") from exc
    bundle = Bundle(root, manifest, pre, list(manifest.classes), check_hash=check_hash)
    bundle.check_contents(defer=defer_hashes)
    return bundle


class _PendingHashes:
    """Bundle.check_file of every listed file on background threads, the biggest first, one thread fewer than the
    CPUs (the caller keeps one busy: ONNX Runtime building its session); ``wait_for`` settles one file now (the
    graph a backend is about to parse), ``result`` raises the first failure in manifest order, whichever thread
    finished first."""

    def __init__(self, bundle: Bundle, paths: list, sizes: list):
        from concurrent.futures import ThreadPoolExecutor

        order = sorted(range(len(paths)), key=lambda i: -sizes[i])
        workers = max(1, min(4, (os.cpu_count() or 1) - 1, len(paths)))
        self._bundle = bundle
        self._paths = paths
        self._index = {rel: i for i, (rel, _, _) in enumerate(paths)}
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgeconv-hash")
        futures = {i: self._pool.submit(bundle.check_file, *paths[i]) for i in order}
        self._futures = [futures[i] for i in range(len(paths))]
        self._pool.shutdown(wait=False)

    def wait_for(self, rel: str) -> bool:
        """``rel``'s comparison done (raising its mismatch), on this thread when no hash thread has started it yet;
        False when it is not among these (already verified: the caller checks its stamp again)."""
        from concurrent.futures import Future

        i = self._index.get(rel)
        if i is None:
            return False
        f = self._futures[i]
        if f.cancel():  # still queued: hash it here rather than wait for the files ahead of it
            f = self._futures[i] = Future()
            try:
                self._bundle.check_file(*self._paths[i])
            except BaseException as exc:
                f.set_exception(exc)
                raise
            f.set_result(None)
        f.result()
        return True

    def result(self) -> None:
        first = None
        for f in self._futures:
            try:
                f.result()
            except EdgeconvError as exc:
                first = first or exc
        if first is not None:
            raise first


def bundle_from_onnx_metadata(path: Path, metadata: dict) -> Bundle:
    """A bare .onnx written by edgeconv carries its classes and preprocessing in metadata_props."""
    try:
        classes = json.loads(metadata["edgeconv.classes"])
        pre = Preprocess.from_dict(json.loads(metadata["edgeconv.preprocess"]))
    except (KeyError, ValueError) as exc:
        raise EdgeconvError(f"{path.name} carries no edgeconv metadata (classes, preprocessing); load the bundle directory instead") from exc
    manifest = Manifest(name=metadata.get("edgeconv.name", path.stem), classes=list(classes), preprocess=pre.to_dict())
    return Bundle(path.parent, manifest, pre, list(classes))
