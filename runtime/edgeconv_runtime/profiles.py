"""Device profiles: the configuration `tune` measured fastest on one device, kept in the bundle.

A profile is ``profiles/<device id>.json`` inside the bundle, listed with its sha256 in the manifest's ``files`` map
like every other file (so an edited profile fails the bundle's check, as an edited graph does). It records:
- ``device``: the machine's identity (CPU model, cores, CPU class for INT8, GPU, Jetson board), as ``bench`` records it;
- ``versions``: the runtime and inference libraries it was measured with;
- ``config``: backend, precision, INT8 graph variant, threads, backend options and batch size;
- ``measured``: the figures that chose it (latency, throughput, accuracy or agreement, drop).

``Model.load(backend="auto")`` runs the profile whose device identity and library versions match this machine
(``profile_for``); a profile from another device or other library versions is passed over with a one-line note.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .errors import EdgeconvError

PROFILE_DIR = "profiles"
PROFILE_FORMAT = "edgeconv.profile"
PROFILE_VERSION = 1
MAX_PROFILE_BYTES = 256 << 10
# the versions a profile's figures depend on: another release of any of these may rank the backends differently
VERSION_KEYS = ("edgeconv-runtime", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "tensorrt-cu12", "tensorrt-cu13")
CONFIG_KEYS = ("backend", "precision", "int8_variant", "threads", "options", "batch")


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return platform.processor() or None


@lru_cache(maxsize=None)
def device_identity() -> dict:
    """What makes two machines the same device for a timing: CPU model, cores this process may use, CPU class for
    INT8, GPU name and compute capability, Jetson board. Cached per process."""
    from .cpuclass import cpu_class
    from .gpu import gpu_info
    from .jetson import jetson_model

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    gpu = gpu_info() or {}
    return {"machine": platform.machine(), "cpu": _cpu_model(), "cores": cores, "cpu_class": cpu_class(),
            "gpu": gpu.get("name"), "gpu_compute_capability": gpu.get("compute_capability"), "jetson": jetson_model()}


def device_id(identity: Optional[dict] = None) -> str:
    """A file-name-safe id: the CPU (or board, or GPU) in words, the core count, and a short hash of the whole identity."""
    identity = identity if identity is not None else device_identity()
    words = identity.get("jetson") or identity.get("gpu") or identity.get("cpu") or identity.get("machine") or "device"
    slug = re.sub(r"[^a-z0-9]+", "-", str(words).lower()).strip("-")[:40].strip("-") or "device"
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{slug}-{identity.get('cores')}c-{digest}"


@lru_cache(maxsize=None)
def current_versions() -> dict:
    from .versions import library_versions

    return {k: v for k, v in library_versions().items() if k in VERSION_KEYS}


def profile_path(identity: Optional[dict] = None) -> str:
    """The bundle-relative path of this device's profile."""
    return f"{PROFILE_DIR}/{device_id(identity)}.json"


def listed_profiles(bundle) -> list:
    """The bundle-relative paths of the profiles the manifest lists."""
    return sorted(rel for rel in (bundle.manifest.files or {}) if rel.startswith(PROFILE_DIR + "/") and rel.endswith(".json"))


def read_profile(bundle, rel: str) -> dict:
    """A listed profile, hash-checked by the bundle (an edited one is refused like an edited graph), shape-checked."""
    from .manifest import read_regular_bytes

    path = bundle.path(rel)  # refuses a file whose sha256 differs from the manifest's, a symlink, a FIFO
    raw = read_regular_bytes(path, rel, bundle.root, MAX_PROFILE_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise EdgeconvError(f"{rel} in {bundle.root} is not readable JSON ({str(exc).splitlines()[0][:80]}); run `edgeconv-runtime tune` again") from exc
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT or not isinstance(doc.get("config"), dict) \
            or not isinstance(doc.get("device"), dict):
        raise EdgeconvError(f"{rel} in {bundle.root} is not an edgeconv device profile; run `edgeconv-runtime tune` again")
    cfg = doc["config"]
    if not isinstance(cfg.get("backend"), str) or not isinstance(cfg.get("precision"), str) \
            or not isinstance(cfg.get("options", {}), dict) or not (cfg.get("threads") is None or isinstance(cfg.get("threads"), int)):
        raise EdgeconvError(f"{rel} in {bundle.root} has a malformed config; run `edgeconv-runtime tune` again")
    return doc


def profile_for(bundle) -> tuple:
    """(profile, note): the profile measured on this device with these library versions, or (None, why not) where
    the bundle has profiles but none fits; (None, None) for a bundle without profiles. An edited profile raises
    (the bundle's hash check); one from another device or other versions is passed over with a note."""
    rels = listed_profiles(bundle)
    if not rels:
        return None, None
    here = profile_path()
    if here not in rels:
        return None, f"no tuned profile for this device ({device_id()}); the bundle has {', '.join(Path(r).stem for r in rels)}: using the default order"
    doc = read_profile(bundle, here)
    if doc["device"] != device_identity():
        return None, f"profile {here} names another device than this one; ignored (run `edgeconv-runtime tune` here)"
    got = {k: v for k, v in (doc.get("versions") or {}).items() if k in VERSION_KEYS}
    changed = sorted(k for k in VERSION_KEYS if got.get(k) != current_versions().get(k))
    if changed:
        what = ", ".join(f"{k} {got.get(k)} -> {current_versions().get(k)}" for k in changed)
        return None, f"profile {here} was tuned with other library versions ({what}); ignored (run `edgeconv-runtime tune` again)"
    return doc, None


def describe_profile(doc: dict, rel: str) -> str:
    cfg = doc["config"]
    opts = " ".join(f"{k}={v}" for k, v in sorted((cfg.get("options") or {}).items()))
    variant = f" ({cfg['int8_variant']} graph)" if cfg.get("int8_variant") else ""
    return (f"tuned profile {rel}: {cfg['backend']} {cfg['precision']}{variant}, {cfg.get('threads') or 'default'} threads"
            + (f", {opts}" if opts else "") + (f", batch {cfg['batch']}" if cfg.get("batch") else ""))


def write_profile(root, doc: dict, sign_key=None) -> str:
    """Put ``doc`` into the bundle at ``root`` as this device's profile: the file written atomically, then the manifest
    (listing it with its sha256) rewritten atomically and sealed; model files are never touched. A signed bundle is
    signed again with ``sign_key`` (required: a new manifest would not match the old signature). Returns the path."""
    from .fileio import atomic_write_bytes, sha256_file
    from .manifest import read_manifest, write_manifest

    root = Path(root)
    check_writable(root, sign_key)
    manifest = read_manifest(root)
    rel = profile_path(doc.get("device"))
    path = root / rel
    path.parent.mkdir(exist_ok=True)
    if path.parent.is_symlink() or not path.parent.is_dir():
        raise EdgeconvError(f"{PROFILE_DIR} in {root} is not a folder of the bundle; remove it and run tune again")
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
    files = dict(manifest.files or {})
    files[rel] = sha256_file(path)
    manifest.files = files
    write_manifest(root, manifest)
    if sign_key is not None:
        from .signing import sign_bundle

        sign_bundle(root, sign_key)
    return rel


def check_writable(root, sign_key=None) -> None:
    """One-line refusals before minutes of measuring: a read-only bundle, or a signed one without the key to re-sign."""
    from .manifest import SIGNATURE_NAME

    root = Path(root)
    if not os.access(root, os.W_OK):
        raise EdgeconvError(f"cannot write a profile into {root} (read-only); copy the bundle somewhere writable, or pass --no-write")
    if os.path.lexists(root / SIGNATURE_NAME) and sign_key is None:
        raise EdgeconvError(f"{root} is signed ({SIGNATURE_NAME}); a profile changes its manifest, which would break the signature: "
                            "pass --sign-key KEY.pem to sign it again, or --no-write")
    if sign_key is not None:
        from .signing import load_private_key

        load_private_key(sign_key)  # a wrong or unreadable key now, not after measuring


__all__ = ["PROFILE_DIR", "device_id", "device_identity", "describe_profile", "listed_profiles", "profile_for", "profile_path",
           "read_profile", "write_profile", "check_writable"]
