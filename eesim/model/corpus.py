"""An offline Python-source corpus: the interpreter's standard library and installed packages.

Files are keyed by "<root label>/<relative path>", and whether a file is held out depends only on a hash of
that key, so the split is deterministic, needs no stored file list, and agrees between machines on the
files they share (a held-out file is never trained on, whatever the corpus cap).
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from eesim.errors import require

SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
MAX_FILE_BYTES = 1_000_000  # bigger .py files are mostly generated tables, not code


@dataclass(frozen=True)
class CorpusFile:
    key: str
    path: Path
    size: int


@dataclass
class CorpusSplit:
    train: list[CorpusFile]
    val: list[CorpusFile]
    roots: list[tuple[str, str]]

    def describe(self) -> dict:
        return {"roots": [f"{label}={path}" for label, path in self.roots],
                "train_files": len(self.train), "train_bytes": sum(f.size for f in self.train),
                "val_files": len(self.val), "val_bytes": sum(f.size for f in self.val)}


def default_roots() -> list[tuple[str, Path]]:
    paths = sysconfig.get_paths()
    roots = [("stdlib", Path(paths["stdlib"]))]
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p.is_dir() and all(p.resolve() != r.resolve() for _, r in roots):
            roots.append(("site", p))
    return roots


def list_files(roots: list[tuple[str, Path]], max_file_bytes: int = MAX_FILE_BYTES) -> list[CorpusFile]:
    """Every non-empty .py file under the roots, sorted by key; each real file once (first root wins).

    Site-packages folders inside a root are skipped: they are roots of their own when wanted.
    """
    seen: set[str] = set()
    files = []
    for label, root in roots:
        root = Path(root)
        require(root.is_dir(), f"corpus root {root} is not a directory")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                if not name.endswith(".py"):
                    continue
                path = Path(dirpath) / name
                try:
                    real, size = os.path.realpath(path), path.stat().st_size
                except OSError:
                    continue
                if real in seen or not 0 < size <= max_file_bytes:
                    continue
                seen.add(real)
                files.append(CorpusFile(f"{label}/{path.relative_to(root).as_posix()}", path, size))
    files.sort(key=lambda f: f.key)
    return files


def _hash(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big")


def is_heldout(key: str, share: float = 0.02) -> bool:
    return _hash(key) % 10_000 < round(share * 10_000)


def split_corpus(roots: list[tuple[str, Path]] | None = None, max_train_mb: float | None = None,
                 val_share: float = 0.02) -> CorpusSplit:
    """Hold out ``val_share`` of the files by key hash; cap the training files at ``max_train_mb``, taking them
    in hash order so that a small cap still samples the whole corpus rather than its alphabetical start."""
    roots = roots or default_roots()
    files = list_files(roots)
    require(files, f"no .py files under {[str(r) for _, r in roots]}")
    val = [f for f in files if is_heldout(f.key, val_share)]
    train = sorted((f for f in files if not is_heldout(f.key, val_share)), key=lambda f: _hash("order:" + f.key))
    if max_train_mb is not None:
        budget, kept = max_train_mb * 1e6, []
        for f in train:
            if budget <= 0:
                break
            kept.append(f)
            budget -= f.size
        train = kept
    return CorpusSplit(train=train, val=val, roots=[(label, str(p)) for label, p in roots])


def read_text(f: CorpusFile) -> str:
    """The file's text; undecodable bytes are replaced (a few legacy-encoded test files)."""
    return f.path.read_bytes().decode("utf-8", errors="replace")
