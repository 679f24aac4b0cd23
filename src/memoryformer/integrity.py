"""File integrity and durability: checksums, manifests, durable atomic writes, finiteness checks, run-folder locks.

- `manifest.json` beside a checkpoint's files records each file's size and SHA-256; `verify_files` re-hashes them
  on load (SHA-256 runs at 0.4-0.6 GB/s on one core of a loaded 2-core Zen 3, so 2-3 s per GB; `verify=False`
  skips it).
- `durable_replace` makes a renamed file or folder survive a power cut: the data is fsynced before the rename and
  the folder holding it after, as POSIX requires for the rename itself to be durable.
- Written files get mode 0666 & ~umask (0644 under the usual umask), whatever the writing library chose.
- Nothing is written through a symbolic link: `replace_file` refuses a link where its file would go,
  `open_nofollow` opens with O_NOFOLLOW, so a run folder unpacked from elsewhere cannot point a write at any other
  file; `check_apart` refuses an output that is, holds or lies inside one of the command's inputs.
- `read_jsonl`: an append-only log whose last line was torn by a crash or a full disk reads up to that line (the
  torn line is dropped with a warning; a resumed run rewrites the file without it, atomically).
- `RunLock`: an advisory `fcntl.flock` on `FOLDER/.lock`, so a second writer of a run folder fails with one line.
- `remove_stale_temps`: the temporary files and folders an interrupted writer left (`.ckpt-12.tmp-<pid>`, ...),
  removed once the lock says no other writer can be filling them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from memoryformer.config import MemoryFormerError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None

log = logging.getLogger("memoryformer")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
LOCK = ".lock"
_CHUNK = 1 << 22  # 4 MB reads while hashing
# What our writers name their temporaries: `.<name>.tmp-<pid>` / `.<name>.old-<pid>` folders (atomic_dir) and
# `.<name>.<pid>.tmp` files (replace_file).
_STALE_RE = re.compile(r"^\..+\.(tmp|old)-\d+$|^\..+\.\d+\.tmp$")


class IntegrityError(MemoryFormerError):
    """A file does not hold what its manifest or its writer recorded (damaged, edited, truncated or non-finite)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Durable writes


def file_mode() -> int:
    """0666 with the process umask applied (os.umask is the only portable way to read it)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders: nothing more can be done there
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def finish_file(path: str | os.PathLike) -> None:
    """A freshly written file: mode 0666 & ~umask, data on disk."""
    os.chmod(path, file_mode())
    fsync_path(path)


def durable_replace(tmp: Path, dest: Path) -> None:
    """Rename `tmp` (a finished file, or a folder of finished files) onto `dest`, durably."""
    if tmp.is_dir():
        fsync_path(tmp)
    os.replace(tmp, dest)
    fsync_path(dest.parent)


def refuse_link(path: str | os.PathLike, what: str = "out") -> None:
    """One line if `path` is a symbolic link: a file we write is never reached through one."""
    if os.path.islink(path):
        raise MemoryFormerError(f"{what}: {path} is a symbolic link (to {os.readlink(path)}); memoryformer does not "
                                "write through links: remove it or choose another path")


def open_nofollow(path: str | os.PathLike, flags: int, what: str = "out") -> int:
    """os.open(path, flags) that refuses a symbolic link in the last component instead of following it."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            refuse_link(path, what)
        raise


def append_line(path: str | os.PathLike, line: str, what: str = "out") -> None:
    """Append one line to a log file (created if absent), never through a symbolic link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(line if line.endswith("\n") else line + "\n")


def replace_file(dest: Path, write) -> None:
    """Call `write(tmp_path)`, then rename the result onto `dest`, so readers never see a partial file. A symbolic
    link at `dest` is refused; one at the temporary name (left there by someone else) is removed, not followed."""
    dest = Path(dest)
    refuse_link(dest, dest.name)
    if not dest.parent.is_dir():  # name the file asked for, not the temporary
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(dest))
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    if os.path.lexists(tmp):
        tmp.unlink()
    try:
        write(tmp)
        finish_file(tmp)
        durable_replace(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def write_text(dest: str | os.PathLike, text: str) -> None:
    """Write a small text file atomically and durably (readers see the old or the new content, never a mix)."""
    replace_file(Path(dest), lambda p: Path(p).write_text(text, encoding="utf-8"))


def save_figure(fig, dest: str | os.PathLike) -> None:
    """A matplotlib figure saved atomically (format from `dest`'s suffix), never through a link."""
    dest = Path(dest)
    replace_file(dest, lambda p: fig.savefig(p, format=dest.suffix.lstrip(".") or "png"))


def check_apart(out: str | os.PathLike, inputs: dict, what: str = "out") -> None:
    """Refuse an output path that is, contains or lies inside one of `inputs` ({flag: path}), links and `..`
    resolved: no command writes over what it reads, --force or not."""
    o = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None or str(path) == "sample" or str(path).startswith("hf:"):  # not files of this machine
            continue
        i = Path(path).resolve()
        if o == i or i.is_relative_to(o) or o.is_relative_to(i):
            rel = "is" if o == i else ("contains" if i.is_relative_to(o) else "lies inside")
            raise MemoryFormerError(f"{what}: {out} {rel} the input {flag} {path}; write the output somewhere else")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log. A torn last line (a crash or a full disk during an append) is dropped with
    a warning; a bad line elsewhere is one error naming the file and the line."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except ValueError:
            if any(x.strip() for x in lines[n:]):
                raise MemoryFormerError(f"{path}:{n}: not a JSON object ({ln[:60]!r}); the log is damaged") from None
            log.warning("memoryformer: %s: dropped a torn last line (%d bytes) left by an interrupted write", path,
                        len(ln))
            break
        records.append(rec)
    return records


def ensure_dir(path: str | os.PathLike, what: str = "out") -> Path:
    """Create folder `path` (and its parents), or say in one line why it cannot be one."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MemoryFormerError(f"{what}: {path} exists and is not a folder") from None
    except NotADirectoryError:
        above = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise MemoryFormerError(f"{what}: {path} lies below {above}, which is a file, not a folder") from None
    except OSError as e:
        raise MemoryFormerError(f"{what}: cannot create the folder {path} ({e.strerror})") from None
    return path


# ---------------------------------------------------------------------------------------------------------------
# Manifests


def write_manifest(folder: Path, names: list[str]) -> None:
    """FOLDER/manifest.json: size and SHA-256 of each of `names` (files already written and fsynced)."""
    files = {n: {"bytes": (folder / n).stat().st_size, "sha256": sha256_file(folder / n)} for n in sorted(names)}
    text = json.dumps({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, indent=1) + "\n"
    replace_file(folder / MANIFEST, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_manifest(folder: Path) -> dict | None:
    """{name: {"bytes", "sha256"}} from FOLDER/manifest.json; None when there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("algorithm") != "sha256" or not all(isinstance(v["sha256"], str) and isinstance(v["bytes"], int)
                                                       for v in files.values()):
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from None
    return files


_verified: dict[str, tuple] = {}  # path -> (sha256, stat signature) of files this process hashed and found intact


def signature(st: os.stat_result) -> list:
    """What identifies one version of a file without reading it; ctime changes on every write, even one that
    restores the size and the mtime afterwards."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_matches(path: Path, digest: str, st: os.stat_result | None = None) -> bool:
    """Does `path` hash to `digest`? Hashed once per process while its stat signature stays the same."""
    path = Path(path)
    key, sig = str(path.resolve()), tuple(signature(st or path.stat()))
    if _verified.get(key) == (digest, sig):
        return True
    if sha256_file(path) != digest:
        return False
    _verified[key] = (digest, sig)
    return True


def remembered_digest(path: str | os.PathLike, memo_dir: Path, error=MemoryFormerError) -> str:
    """SHA-256 of a file's bytes, remembered in MEMO_DIR while its stat signature stays the same (so a large source
    is read once, yet an edit that restores its size and mtime is still noticed through its ctime)."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    memo = memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:24]}.json"
    try:
        rec = json.loads(memo.read_text(encoding="utf-8"))
        if rec["signature"] == signature(st) and isinstance(rec["sha256"], str):
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or a damaged one: hash the file
    digest = sha256_file(path)
    text = json.dumps({"path": str(path), "signature": signature(st), "sha256": digest})
    try:
        memo_dir.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, memo)
    except OSError:  # a read-only memo folder only costs hashing again next time
        pass
    return digest


def sha256_array(array) -> str:
    """SHA-256 of a numpy array's bytes, read in 32 MB slices (a memmap is never loaded whole)."""
    import numpy as np

    h, flat = hashlib.sha256(), np.asarray(array).reshape(-1)
    step = max(1, (32 << 20) // max(flat.itemsize, 1))
    for i in range(0, len(flat), step):
        h.update(np.ascontiguousarray(flat[i : i + step]).tobytes())
    return h.hexdigest()


def verify_files(folder: Path, names: tuple[str, ...] | list[str], *, required=False) -> bool:
    """Check `names` against FOLDER/manifest.json (size, then SHA-256); the first difference is an IntegrityError.

    Returns False when the folder has no manifest (written before manifests existed, or by hand): an error when
    `required` (a bool, or a callable asked only then), else a logged warning. A file is hashed once per process
    while its size, mtime and ctime stay put.
    """
    files = read_manifest(folder)
    if files is None:
        if required() if callable(required) else required:
            raise IntegrityError(f"{folder / MANIFEST}: missing, though the checkpoint's writer recorded one "
                                 "(damaged or incomplete checkpoint)")
        log.warning("memoryformer: %s has no %s; its files are not verified", folder, MANIFEST)
        return False
    for name in names:
        entry, path = files.get(name), folder / name
        if entry is None:
            raise IntegrityError(f"{path}: not listed in {folder / MANIFEST}")
        st = path.stat()
        if st.st_size != entry["bytes"]:
            raise IntegrityError(f"{path}: {st.st_size} bytes, but {MANIFEST} recorded {entry['bytes']} (truncated "
                                 "or replaced since it was written)")
        if not file_matches(path, entry["sha256"], st):
            raise IntegrityError(f"{path}: SHA-256 differs from {MANIFEST} (damaged or edited since it was written; "
                                 "pass --no-verify / verify=False to load it anyway)")
    return True


def check_finite(tensors: dict, what: str) -> None:
    """Every floating tensor of `tensors` ({name: tensor}) finite, else an IntegrityError naming the first one."""
    import torch

    for name, t in tensors.items():
        if not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()):
            continue
        lo, hi = torch.aminmax(t.detach())  # one pass, no copy; NaN propagates to both (25x faster than isfinite)
        if not bool(lo.isfinite() & hi.isfinite()):
            bad = int((~t.isfinite()).sum())
            raise IntegrityError(f"{what}: tensor {name!r} holds {bad} non-finite value{'s' * (bad > 1)} (NaN or inf)")


# ---------------------------------------------------------------------------------------------------------------
# Run folders: one writer at a time, no leftovers


class RunLock:
    """Hold an exclusive advisory lock on FOLDER/.lock (created with FOLDER) while a run writes into it.

    A second writer gets an error naming the folder and the holder's pid. If the folder was created here and is
    left holding only the lock file, it is removed again on exit (a run that failed before writing anything).
    """

    def __init__(self, folder: str | os.PathLike, what: str = "out"):
        self.folder, self.what, self.fd, self.created = Path(folder), what, None, False

    def __enter__(self) -> "RunLock":
        self.created = not self.folder.exists()
        ensure_dir(self.folder, self.what)
        if fcntl is None:
            return self
        fd = open_nofollow(self.folder / LOCK, os.O_RDWR | os.O_CREAT, LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MemoryFormerError(f"{self.folder}: another memoryformer process (pid {holder}) is writing to this "
                                    f"run folder; wait for it to finish or pick another --{self.what}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        if self.created and self.folder.is_dir() and {p.name for p in self.folder.iterdir()} <= {LOCK}:
            shutil.rmtree(self.folder, ignore_errors=True)


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete what interrupted writers left in `folder` (call only while holding its RunLock); the names removed."""
    folder, removed, size = Path(folder), [], 0
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not _STALE_RE.match(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            size += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
        else:
            size += p.lstat().st_size
            p.unlink(missing_ok=True)
        removed.append(p.name)
    if removed:
        log.warning("memoryformer: removed %d temporary file(s)/folder(s) (%.1f MB) that an interrupted writer left "
                    "in %s: %s", len(removed), size / 1e6, folder, ", ".join(sorted(removed)))
    return removed
