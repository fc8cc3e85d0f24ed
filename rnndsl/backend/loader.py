"""Generated modules on disk: written once per content hash, atomically, then imported.

A module is keyed by the hash of its text (which holds the IR, dtype and rnndsl version),
Numba's version and the back end's source (`_backend_hash`), so Numba's own `cache=True` can reuse compiled kernels across processes.
The directory is $RNNDSL_CACHE_DIR, else $XDG_CACHE_HOME/rnndsl, else ~/.cache/rnndsl.

The cache is a copy of what the compiler can always make again, so damage is repaired, not
reported: a module whose bytes differ from its text is rewritten, and Numba's index and data
files of a module whose index cannot be read are deleted (Numba then compiles again). What
cannot be repaired (a cache folder that cannot be created or written, a folder standing where
a module should be) is a `UserError` naming the path. Only files named `rnndsl_gen_*` are ever
written or deleted, so pointing the cache at a shared folder cannot lose anything else.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pickletools
import sys
import tempfile
from pathlib import Path

import numba

from rnndsl.language.errors import UserError

PREFIX = "rnndsl_gen_"


def cache_root() -> Path:
    """Where the cache is (without creating it)."""
    root = os.environ.get("RNNDSL_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative path
        return Path(xdg) / "rnndsl"
    try:
        return Path.home() / ".cache" / "rnndsl"
    except RuntimeError:  # no HOME and no password entry
        raise _unusable("~/.cache/rnndsl", "the home folder is unknown") from None


def cache_dir() -> Path:
    """The cache folder, created if needed."""
    path = cache_root()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unusable(path, exc.strerror or str(exc)) from None
    return path


def _unusable(path, reason: str) -> UserError:
    return UserError(f"kernel cache {path}: {reason}; set RNNDSL_CACHE_DIR (or XDG_CACHE_HOME) "
                     "to a writable folder")


def cache_files(root: Path | None = None) -> list[Path]:
    """Every file of the cache: generated modules, their bytecode and Numba's kernels."""
    root = cache_root() if root is None else root
    return sorted(p for folder in (root, root / "__pycache__") if folder.is_dir()
                  for p in folder.glob(f"{PREFIX}*") if p.is_file())


def clear_cache() -> int:
    """Delete the cache's files (only `rnndsl_gen_*` ones); returns how many."""
    files = cache_files()
    for p in files:
        p.unlink(missing_ok=True)
    return len(files)


def content_hash(source: str) -> str:
    return hashlib.sha256(f"{numba.__version__}\n{_backend_hash()}\n{source}".encode()) \
        .hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _backend_hash() -> str:
    """The hash of the back end's own source. Generated kernels call compiled functions of
    these modules (the micro-kernel, the BLAS wrapper, the kernel library), and Numba's cache
    of a caller keeps the callee's code as it was when compiled, even after the callee's source
    changes; so a change there must change every module's key."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def load_module(source: str, stem: str):
    """Write `source` as <cache>/rnndsl_gen_<stem>_<hash>.py unless already there, and import
    it."""
    digest = content_hash(source)
    name = f"{PREFIX}{stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{name}.py"
    _write_unless_same(path, source.encode())
    _drop_unreadable_numba_index(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _write_unless_same(path: Path, data: bytes) -> None:
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise UserError(f"kernel cache: {path} is not a file; delete it or run "
                        "`rnndsl cache clear`")
    try:
        if path.is_file() and path.read_bytes() == data:
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=PREFIX, suffix=".tmp")
    except OSError as exc:
        raise _unusable(path.parent, exc.strerror or str(exc)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _unusable(path.parent, exc.strerror or str(exc)) from None


def _drop_unreadable_numba_index(path: Path) -> None:
    """Numba fails on every call when one of its cache files (`<module>.<function>-<line>
    .pyXY.nbi`, an index of two pickles, and `....N.nbc`, one pickle each) is truncated or
    garbled; such a function's files are deleted, so that Numba compiles it again. The pickles
    are walked opcode by opcode (`pickletools.genops`), never loaded."""
    for index in path.parent.glob(f"__pycache__/{path.stem}.*.nbi"):
        group = list(index.parent.glob(index.name.removesuffix("nbi") + "*"))
        if not all(_whole_pickles(f, 2 if f.suffix == ".nbi" else 1) for f in group):
            for stale in group:
                stale.unlink(missing_ok=True)


def _whole_pickles(path: Path, count: int) -> bool:
    try:
        with open(path, "rb") as f:
            for _ in range(count):
                for _op in pickletools.genops(f):
                    pass
            return f.read(1) == b""
    except Exception:  # noqa: BLE001 - whatever genops makes of garbage, it is garbage
        return False
