"""Every output goes through here: never over an input, whole or not at all, one writer at a time.

* ``resolve_inputs(sources)``: the resolved files a run reads (every file of an input folder, index
  files and the shards they name; symlinks and ``..`` resolved) and the input model folders.
* ``check_output(path, inputs)``: refuses an output that is one of those files, a folder holding one
  of them, or a path inside an input model folder. The one guard of every writer.
* ``Output``: a transaction for one output, a file or a folder. Its members are written into a
  hidden staging folder beside the target, under a lock that a second writer of the same target meets
  at once (the message names the holder: pid, host, start time). ``commit`` puts the whole output in
  place: a folder target is exchanged atomically (``renameat2(RENAME_EXCHANGE)`` on Linux, else two
  renames: a moment without an output, never a mixed one); a ``.safetensors`` file target replaces
  the members of an earlier output of the same stem (file, shards, index) index-first and removes
  the ones the new output lacks. An existing folder is replaced only if it is empty or an earlier
  tsv_fast output. ``abort`` (also on any exception inside ``with``) leaves nothing behind.
* ``Output.join``: another process's staging folder (a rank of a distributed run writing its shards
  into rank 0's output); the lock, the commit and the removal on failure stay with the owner.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import struct
import time
from collections.abc import Iterable
from pathlib import Path

INDEX_SUFFIX = ".safetensors.index.json"
PART_MANIFEST = "tsv-fast-part.json"  # what a `merge --shard i/N` part folder holds beside its shards
STAGING_PREFIX = ".tsv-fast-staging-"
_SHARD_GLOB = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"
_MODEL_FILES = ("config.json", "adapter_config.json", "model.safetensors", "model" + INDEX_SUFFIX,
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_inputs(sources: Iterable[object]) -> tuple[set[Path], set[Path]]:
    """(files, model folders) behind ``sources``: paths, or objects with ``files`` / ``folder``."""
    files: set[Path] = set()
    folders: set[Path] = set()
    for source in sources:
        if source is None:
            continue
        if not isinstance(source, (str, os.PathLike)):
            more_files, more_folders = resolve_inputs([*getattr(source, "files", []),
                                                       *filter(None, [getattr(source, "folder", None)])])
            files, folders = files | more_files, folders | more_folders
            continue
        path = Path(source)
        if not path.exists():
            continue
        resolved = path.resolve()
        if resolved.is_dir():
            folders.add(resolved)
            files |= {p.resolve() for p in resolved.rglob("*") if p.is_file()}
        else:
            files.add(resolved)
            if resolved.name.endswith(".index.json"):
                folders.add(resolved.parent)
                files |= _index_members(resolved)
            elif resolved.parent.is_dir() and any((resolved.parent / n).is_file() for n in _MODEL_FILES[:2]):
                folders.add(resolved.parent)  # a weight file of a model folder (it has a config)
    return files, folders


def _index_members(index: Path) -> set[Path]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {(index.parent / name).resolve() for name in set(weight_map.values()) if isinstance(name, str)}


def check_output(path: str | os.PathLike, inputs: Iterable[object], what: str = "output") -> Path:
    """``path`` resolved, or ValueError when writing it could touch an input."""
    target = Path(path).resolve()
    files, folders = resolve_inputs(inputs)
    for file in files:
        if target == file:
            raise ValueError(f"{what} {path} would overwrite input {file}; choose another path")
        if target in file.parents:
            raise ValueError(f"{what} {path} would overwrite input {file} (the output folder holds it); "
                             "choose another path")
    for folder in folders:
        if target == folder:
            raise ValueError(f"{what} {path} would overwrite input folder {folder}; choose another path")
        if folder in target.parents:
            raise ValueError(f"{what} {path} is inside the input model folder {folder}; write it elsewhere")
    return target


class OutputLocked(RuntimeError):
    pass


class Output:
    """One output being written; see the module docstring.

    ``target``: a file (``merged.safetensors``, ``sti.json``) or a folder (``merged/``), as ``folder``
    says (default: a path without a suffix is a folder). Members are written to ``member(name)``; a
    file output has one member named like the target, or shards and an index for ``.safetensors``.
    """

    def __init__(self, target: str | os.PathLike, *, inputs: Iterable[object] = (), folder: bool | None = None,
                 what: str = "output"):
        self.target = Path(target)
        self.folder = (self.target.suffix == "") if folder is None else folder
        check_output(self.target, inputs, what)
        if self.target.exists():
            if self.target.is_dir() != self.folder:
                kind = "a folder" if self.target.is_dir() else "a file"
                raise ValueError(f"{what} {self.target} exists and is {kind}; remove it or choose another path")
            if self.folder and any(self.target.iterdir()) and not _is_our_output(self.target):
                raise ValueError(f"{what} folder {self.target} exists and holds files tsv_fast did not write; "
                                 "choose a new or empty folder (nothing was changed)")
        if not self.folder:
            _refuse_foreign_family(self.target, what)
        self._made = _make_folders(self.target.parent)  # removed again if the output is aborted
        try:
            self._lock = _Lock(self.target.parent / f".{self.target.name}.tsv-fast.lock", self.target)
        except BaseException:
            _remove_empty(self._made)
            raise
        token = f"{os.getpid()}-{time.time_ns() % 10**9}"
        self.staging = self.target.parent / f"{STAGING_PREFIX}{self.target.name}-{token}"
        try:
            self.staging.mkdir()
        except BaseException:
            self._lock.release()
            _remove_empty(self._made)
            raise
        self._done = False

    @classmethod
    def join(cls, staging: str | os.PathLike, target: str | os.PathLike, *, folder: bool) -> Output:
        """The staging folder another process opened for ``target`` (rank 0 of a distributed run):
        members can be written into it; ``commit`` is the owner's, ``abort`` leaves the folder alone."""
        staging = Path(staging)
        if not staging.is_dir():
            raise ValueError(f"the output's staging folder {staging} is not visible here: every rank of a "
                             "distributed run must see the output folder (a shared filesystem)")
        out = cls.__new__(cls)
        out.target, out.folder, out.staging, out._lock, out._done = Path(target), folder, staging, None, True
        return out

    def member(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> Path:
        """Put the staged members in place as one unit; returns the target."""
        if self._lock is None:
            raise RuntimeError(f"only the process that opened {self.target} commits it")
        try:
            for member in self.staging.iterdir():
                _fsync(member)
            if self.folder:
                _swap_in_folder(self.staging, self.target)
            else:
                _swap_in_files(self.staging, self.target)
        finally:
            self._cleanup()
        return self.target

    def abort(self) -> None:
        """Drop the staged members; folders this output created are removed too (no empty folder)."""
        done = self._done
        self._cleanup()
        if not done:
            _remove_empty(self._made)

    def _cleanup(self) -> None:
        if not self._done:
            self._done = True
            shutil.rmtree(self.staging, ignore_errors=True)
            self._lock.release()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


def write_file(path: str | os.PathLike, data: str | bytes, *, inputs: Iterable[object] = (),
               what: str = "output") -> Path:
    """A small output (JSON, CSV, a report) written whole through an Output."""
    with Output(path, inputs=inputs, folder=False, what=what) as out:
        member = out.member(Path(path).name)
        member.write_bytes(data.encode() if isinstance(data, str) else data)
        return out.commit()


def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file (empty when unreadable); no tensor is read."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                return {}
            header = json.loads(f.read(length))
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, struct.error):
        return {}


def _is_ours(file: Path) -> bool:
    if file.name.endswith(".json"):  # an index, or a part manifest
        try:
            meta = json.loads(file.read_text()).get("metadata", {})
        except (OSError, ValueError, AttributeError):
            return False
    else:
        meta = safetensors_metadata(file)
    return isinstance(meta, dict) and "tsv_fast_version" in meta


def _is_our_output(folder: Path) -> bool:
    marks = [*folder.glob("*.safetensors"), *folder.glob("*" + INDEX_SUFFIX), *folder.glob(PART_MANIFEST)]
    return bool(marks) and all(_is_ours(f) for f in marks)


def _family(target: Path) -> list[Path]:
    """The files of an earlier output at a ``.safetensors`` target: the file, its index, its shards."""
    if not target.name.endswith(".safetensors"):
        return [target] if target.is_file() else []
    stem = target.name[: -len(".safetensors")]
    found = [target, target.parent / (stem + INDEX_SUFFIX), *target.parent.glob(stem + _SHARD_GLOB)]
    return [p for p in found if p.is_file()]


def _refuse_foreign_family(target: Path, what: str) -> None:
    """Shards or an index beside a .safetensors target that tsv_fast did not write would make the
    folder ambiguous after the write (which file is the model?): refuse instead of deleting them."""
    foreign = [p for p in _family(target) if p != target and not _is_ours(p)]
    if foreign:
        raise ValueError(f"{what} {target}: {foreign[0].name} beside it belongs to another model; "
                         "choose another name or folder (nothing was changed)")


def _swap_in_folder(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
    elif _exchange(staging, target):  # staging now holds the old output
        shutil.rmtree(staging, ignore_errors=True)
    else:
        old = target.parent / f"{STAGING_PREFIX}{target.name}-old-{os.getpid()}"
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _swap_in_files(staging: Path, target: Path) -> None:
    """The new members replace the earlier output's: its index first (no reader follows it into new
    shards), then the members, the new index last; members the new output lacks are removed."""
    new = {p.name for p in staging.iterdir()}
    old = _family(target)
    for path in old:
        if path.name.endswith(".index.json"):
            path.unlink()
    for name in sorted(new, key=lambda n: n.endswith(".index.json")):
        os.replace(staging / name, target.parent / name)
    for path in old:
        if path.name not in new:
            path.unlink(missing_ok=True)
    _fsync(target.parent)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the ones created, deepest first."""
    made = []
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for path in reversed(made):
        path.mkdir(exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stop at the first that holds something
        try:
            folder.rmdir()
        except OSError:
            return


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Lock:
    """One writer per output: an exclusive flock on a lock file beside it, which records the holder.
    A lock left by a process that died is taken over (the flock died with it)."""

    def __init__(self, path: Path, target: Path):
        import fcntl

        self.path = path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise OutputLocked(f"output {target} is being written by {holder}; wait for it to finish "
                                   "or choose another output") from None
            try:  # the holder may have released (and unlinked) it between our open and flock
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing drops the flock
            self.fd = None
