"""Generated modules on disk: written once per content hash, atomically, then imported.

A module is keyed by the hash of its text (which holds the IR, dtype and rnndsl version) and
Numba's version, so Numba's own `cache=True` can reuse compiled kernels across processes.
The directory is $RNNDSL_CACHE_DIR, or ~/.cache/rnndsl.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numba


def cache_dir() -> Path:
    root = os.environ.get("RNNDSL_CACHE_DIR") or Path.home() / ".cache" / "rnndsl"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def content_hash(source: str) -> str:
    return hashlib.sha256(f"{numba.__version__}\n{source}".encode()).hexdigest()[:20]


def load_module(source: str, stem: str):
    """Write `source` as <cache>/<stem>_<hash>.py unless already there, and import it."""
    digest = content_hash(source)
    name = f"rnndsl_gen_{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
