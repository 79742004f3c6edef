"""Atomic writes and fingerprints: the one way every llama2vec writer puts a file or folder on disk.

Reading: whole text and JSON files with errors that name the file and line (`read_text_file`,
`read_json`), strict JSON (`strict_json`) and text that can be written (`check_text`).

Atomic: a file or folder is written under a temporary name in its own folder (``.NAME.tmp-PID``),
flushed to disk (fsync) and renamed over the final name, so a reader sees the old version or the
whole new one, never a part. A process killed half-way leaves only its temporary, which the next
writer of the same folder removes (`clean_stale`: the temporaries whose process is gone).

Fingerprints: a cached artefact records what made it (the identity of its inputs, of the model
folder, the options that change the result and the code), so that a later run can tell whether it
may reuse it (`fingerprint`, `differences`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import Llama2VecError

log = logging.getLogger(__name__)

TMP_TAG = ".tmp-"
HEAD_TAIL = 1 << 20  # bytes hashed at each end of a file too large to hash whole
WHOLE_LIMIT = 64 << 20  # files up to this size are hashed whole


# --------------------------------------------------------------------------------------------
# Temporaries


def _host() -> str:
    """This machine's name, kept to letters, digits and '-' (temporaries name their machine, so
    jobs on several machines writing one shared folder neither clash nor remove each other's)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def temp_path(path: Path) -> Path:
    """The temporary name this process writes `path` under: `.NAME.tmp-PID.HOST` in the same folder."""
    return path.with_name(f".{path.name}{TMP_TAG}{os.getpid()}.{_host()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` left by processes that are gone (killed runs).
    Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_TAG}*"):
        pid, _, host = p.name.rsplit(TMP_TAG, 1)[1].partition(".")
        if host and host != _host():  # another machine's: it cannot be told dead from here
            continue
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        remove(p)
        removed.append(p)
    if removed:
        log.info("%s: removed %d temporary file(s) of killed runs", folder, len(removed))
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def ensure_folder(folder: Path) -> Path:
    """mkdir -p with a clear error for a path blocked by a file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise Llama2VecError(f"{folder}: cannot create the folder: a file is in the way") from None
    return folder


# --------------------------------------------------------------------------------------------
# Atomic files and folders


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write `path` through; on success it is fsynced and renamed over
    `path`, on any error (a full disk included) it is removed and `path` is left as it was."""
    path = Path(path)
    ensure_folder(path.parent)
    clean_stale(path.parent)
    tmp = temp_path(path)
    remove(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:  # a full disk, a file size limit, ...: named by the file meant, not the temporary
        remove(tmp)
        raise Llama2VecError(f"{path}: cannot write: {e.strerror or e}") from e
    except BaseException:
        remove(tmp)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically."""
    path = Path(path)
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_lines(path: str | Path, rows: Iterable[str]) -> int:
    """Write rows (each without its newline) atomically, streaming; returns the row count."""
    n = 0
    with atomic_file(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(row + "\n")
            n += 1
    return n


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder to fill; on success its files are fsynced and it replaces
    `path` (an older `path` is moved aside first and deleted after), on error it is removed."""
    path = Path(path)
    ensure_folder(path.parent)
    clean_stale(path.parent)
    tmp = temp_path(path)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old{TMP_TAG}{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        remove(tmp)
        raise


@contextlib.contextmanager
def scratch_folder(parent: str | Path, name: str = "scratch") -> Iterator[Path]:
    """A temporary working folder in `parent`, removed afterwards (and by `clean_stale` if killed)."""
    parent = ensure_folder(Path(parent))
    clean_stale(parent)
    tmp = temp_path(parent / name)
    remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        remove(tmp)


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(value: str, what: str) -> None:
    """A JSON or YAML escape can make a lone surrogate ("\\ud800") that no encoding can write: an
    error naming `what` (file, line, field)."""
    if _SURROGATE.search(value):
        raise Llama2VecError(f"{what} holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not valid text")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(text: str) -> Any:
    """json.loads without the NaN/Infinity extension. Raises JSONDecodeError, ValueError (NaN, an
    integer of over 4300 digits) or RecursionError (nested too deep)."""
    return json.loads(text, parse_constant=_no_constant)


def open_for_reading(path: Path, missing: str = "file not found"):
    """`path` opened in binary mode, or an error naming it (missing, a folder, unreadable)."""
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise Llama2VecError(f"{path}: {missing}") from None
    except IsADirectoryError:
        raise Llama2VecError(f"{path}: is a folder, expected a file") from None
    except (OSError, ValueError) as e:  # permission denied and the like; a NUL byte in the path
        raise Llama2VecError(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}") from None


def read_text_file(path: Path, missing: str = "file not found") -> str:
    """A whole UTF-8 file, a leading byte order mark dropped; errors name the file (and line)."""
    with open_for_reading(path, missing) as fh:
        try:
            raw = fh.read()
        except OSError as e:
            raise Llama2VecError(f"{path}: cannot read: {e.strerror or e}") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise Llama2VecError(f"{path}:{line}: bytes that are not UTF-8 (byte 0x{raw[e.start]:02x})") from None


def parse_json_text(path: Path, text: str) -> Any:
    """Strict JSON; errors name the file and line."""
    try:
        return strict_json(text)
    except json.JSONDecodeError as e:
        raise Llama2VecError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise Llama2VecError(f"{path}: not valid JSON: {e}") from None


def read_json(path: str | Path) -> Any:
    """A JSON file, or a clear error naming it (and the line) when it is unreadable."""
    path = Path(path)
    return parse_json_text(path, read_text_file(path))


def read_json_or_none(path: str | Path) -> Any:
    """A cached JSON file, or None when it is missing or unreadable (then it is recomputed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except Llama2VecError as e:
        log.warning("%s; it is recomputed", e)
        return None


# --------------------------------------------------------------------------------------------
# Fingerprints


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_identity(path: str | Path) -> str:
    """A content hash of a file; for a file over 64 MiB, a hash of its size, modification time and
    first and last MiB (fast on any size, and any edit that keeps size and time is very unlikely)."""
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as fh:
        if st.st_size <= WHOLE_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return h.hexdigest()[:20]
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(fh.read(HEAD_TAIL))
        fh.seek(-HEAD_TAIL, os.SEEK_END)
        h.update(fh.read(HEAD_TAIL))
    return "large:" + h.hexdigest()[:20]


CARD = "README.md"  # a model's card: what `evaluate` writes its figures into, not what encodes


def folder_identity(folder: str | Path) -> str:
    """The identity of a folder (a model folder): its files' names and identities, its card aside."""
    folder = Path(folder)
    parts = []
    for p in sorted(folder.rglob("*")):
        if (p.is_file() and TMP_TAG not in p.name and "checkpoints" not in p.relative_to(folder).parts
                and p.relative_to(folder).as_posix() != CARD):
            parts.append(f"{p.relative_to(folder)}={file_identity(p)}")
    return _sha("\n".join(parts).encode())[:20]


def model_identity(name: str) -> str:
    """A local model folder's identity, or the hub id (whose files the hub versions)."""
    path = Path(name).expanduser()
    return f"folder:{folder_identity(path)}" if path.is_dir() else f"hub:{name}"


def texts_identity(ids: Iterable[str], texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for i, t in zip(ids, texts):
        h.update(i.encode("utf-8", "surrogatepass") + b"\0" + t.encode("utf-8", "surrogatepass") + b"\1")
    return h.hexdigest()[:20]


def code_identity() -> str:
    """A hash of this package's source: a cache made by other code is not reused."""
    folder = Path(__file__).parent
    return _sha(b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.glob("*.py"))))[:16]


def fingerprint(**parts: Any) -> dict[str, Any]:
    """What made an artefact, as a JSON-able dict (values are made JSON-plain)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))


def differences(old: dict | None, new: dict) -> list[str]:
    """The names of the parts that differ between two fingerprints (all of them if `old` is None)."""
    if not isinstance(old, dict):
        return sorted(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def fingerprint_key(fp: dict) -> str:
    """A short name for a fingerprint (a cache folder's name)."""
    return _sha(json.dumps(fp, sort_keys=True).encode())[:16]
