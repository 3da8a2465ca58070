"""Atomic output: write under a temporary name beside the target, rename into place when complete.

A run killed at any moment leaves either no output or, with ``force``, the previous output whole. A
leftover temporary is named ``.<target>.lora-lego-partial-<pid>`` and removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from .errors import LoraLegoError

PARTIAL_TAG = ".lora-lego-partial-"


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def check_output_path(target: Path, inputs: Iterable[Path], force: bool) -> None:
    """Refuse an output that is an input, lies inside one, or contains one; and an existing non-empty
    output unless ``force``. First removes what a killed earlier run left for this target (putting back a
    previous output it had set aside), so that the checks see what the user would see."""
    remove_stale_partials(Path(target))
    target_r = Path(os.path.abspath(target)).resolve()
    for inp in inputs:
        inp_r = Path(os.path.abspath(inp)).resolve()
        if target_r == inp_r or _is_within(target_r, inp_r) or _is_within(inp_r, target_r):
            raise LoraLegoError(f"output {target} is, contains or lies inside input {inp}; inputs are never written",
                                path=target)
    if target.exists() or target.is_symlink():
        empty_dir = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
        if not empty_dir and not force:
            raise LoraLegoError("output exists and is not empty; pass --force to replace it", path=target)
        if not empty_dir and not _looks_like_output(target):
            raise LoraLegoError("output exists and holds no adapter (no adapter_config.json or .safetensors file); "
                                "--force only replaces an earlier output: remove it yourself if you mean it", path=target)
    parent = target_r.parent
    while not parent.exists():  # missing parents are created at write time; check the first that exists
        parent = parent.parent
    if not parent.is_dir():
        raise LoraLegoError(f"{parent} is not a folder", path=target)
    if not os.access(parent, os.W_OK):
        raise LoraLegoError(f"output folder {parent} is not writable", path=target)


def _looks_like_output(target: Path) -> bool:
    """Whether ``--force`` may replace ``target``: an adapter folder or a .safetensors file, never a folder of
    something else (a mistyped ``-o ~`` must not delete a home directory)."""
    if target.is_dir():
        return (target / "adapter_config.json").is_file() or any(
            p.suffix == ".safetensors" and p.is_file() for p in target.iterdir())
    return target.suffix == ".safetensors"


def output_label(path: object) -> str:
    """The path the user asked for, for a path inside a temporary output (messages name the target, not
    ``.<name>.lora-lego-partial-<pid>``)."""
    parts = [m.group(1) if (m := _PARTIAL_NAME.fullmatch(part)) else part for part in Path(str(path)).parts]
    return str(Path(*parts)) if parts else str(path)


_PARTIAL_NAME = re.compile(rf"\.(.+){re.escape(PARTIAL_TAG)}\d+")


def remove_stale_partials(target: Path) -> None:
    """Remove temporaries that an earlier, killed run left for this target. A run killed inside the
    two-step replacement (where the one-step swap is unavailable) leaves the previous output as
    ``<temporary>.old`` and no target: that is put back, not removed."""
    parent = Path(os.path.abspath(target)).parent
    prefix = f".{target.name}{PARTIAL_TAG}"
    if not parent.is_dir():
        return
    for entry in sorted(parent.iterdir()):
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another run is writing right now
        if entry.name.endswith(".old") and not (target.exists() or target.is_symlink()):
            with contextlib.suppress(OSError):  # if it cannot be put back, it is kept, never removed
                os.rename(entry, target)
            continue
        _remove(entry)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # a leftover that cannot be removed now is removed by a later run
            path.unlink()


def _fsync_tree(path: Path) -> None:
    """Sync every file and folder (folders too, so that their entries survive a power cut)."""
    files = [path] if path.is_file() else [*(p for p in path.rglob("*") if p.is_file() or p.is_dir()), path]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    res = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return res == 0


@contextlib.contextmanager
def atomic_output(target: Path, *, force: bool = False, directory: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write the whole output into; on normal exit verify it (every safetensors
    header re-read and checked against the file's size, every JSON file parsed), sync it to disk and move
    it to ``target``.

    On an exception the temporary is removed and ``target`` is untouched; an OSError (disk full, file too
    large, permissions) becomes a one-line LoraLegoError naming ``target``."""
    target = Path(target)
    parent = Path(os.path.abspath(target)).parent
    created = [p for p in [parent, *parent.parents] if not p.exists()]
    tmp = parent / f".{target.name}{PARTIAL_TAG}{os.getpid()}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        _remove(tmp)
        if directory:
            tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        verify_output(tmp, target)
        _commit(tmp, target, force=force)
    except BaseException as e:
        _remove(tmp)
        for p in created:  # parents this call made, innermost first
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and not isinstance(e, LoraLegoError):
            raise LoraLegoError(f"cannot write output ({e.strerror or e}); nothing was written", path=target) from None
        raise


def verify_output(tmp: Path, target: Path) -> None:
    """Re-read what was written before it is renamed into place: each safetensors header must parse and its
    tensors must tile the file's data exactly (catches a short write), each JSON file must parse."""
    import json

    from .formats.tensors import read_safetensors_header

    # a one-file output's temporary has no suffix of its own: it is the target's
    files = [(tmp, target.suffix)] if tmp.is_file() else sorted((p, p.suffix) for p in tmp.rglob("*") if p.is_file())
    for f, suffix in files:
        try:
            if suffix == ".safetensors":
                read_safetensors_header(f)
            elif suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
        except (LoraLegoError, ValueError) as e:
            raise LoraLegoError(f"the written {f.name} failed verification ({e}); nothing was written",
                                path=target) from None


def _commit(tmp: Path, target: Path, *, force: bool) -> None:
    exists = target.exists() or target.is_symlink()
    if not exists:
        os.rename(tmp, target)
    elif target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
        os.rename(tmp, target)
    elif not force:
        raise LoraLegoError("output appeared while merging and is not empty; pass --force to replace it", path=target)
    elif tmp.is_dir() != (target.is_dir() and not target.is_symlink()):
        raise LoraLegoError("output exists and is a " + ("file" if tmp.is_dir() else "folder")
                            + "; remove it first", path=target)
    elif tmp.is_dir():
        # swap in one step, so the old output is replaced whole; tmp then holds the old one
        if _exchange(tmp, target):
            _remove(tmp)
        else:
            old = target.parent / f".{target.name}{PARTIAL_TAG}{os.getpid()}.old"
            os.rename(target, old)
            os.rename(tmp, target)
            _remove(old)
    else:
        os.replace(tmp, target)
    with contextlib.suppress(OSError):
        fd = os.open(Path(os.path.abspath(target)).parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
