"""Durable, atomic file writes and the overwrite policy, shared by every writer in fm.

`atomic_write(path, writer)` is the one way fm writes a file (or a directory): the writer fills a temp
path beside the target, which is then fsynced and renamed over it, so a crash leaves either the old
content or the complete new one, never half of it. `refuse_existing(path, force)` is the one overwrite
check every command with an output path runs before doing any work (docs/architecture.md section 10).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import re
import shlex
import shutil
import socket
import uuid
from pathlib import Path
from typing import Callable

from .errors import UsageError

_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
TEMP_MARK = ".fm-writing"  # in a folder output's temp folder while its writer (host and pid inside) holds its lock


def atomic_write(path: str | Path, writer: Callable[[Path], object], *, durable: bool = True) -> Path:
    """Call `writer(tmp)` to write a file (or a directory) at `tmp`, then move it to `path` atomically.

    `durable` fsyncs the data and the directory entry (off only for throwaway caches). On any failure,
    Ctrl-C included, the temp path is removed and `path` is untouched. A symbolic link is written through (its
    target replaced beside itself, the link kept: `fm sample --out LINK.png`), as `named_path` does for folders.
    """
    given = Path(path)
    path = _write_through(given)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        writer(tmp)
        commit(tmp, path, durable=durable)
    finally:
        _remove(tmp)
    return given


def _write_through(path: Path) -> Path:
    """Where a write of `path` goes: `path`, or the file a symbolic link there names (which may not exist yet, as
    `echo > LINK` creates it); a loop is refused."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if target.is_symlink():  # realpath stops on a loop
        raise UsageError(f"{path} is a symbolic link that cannot be followed (a loop); fix the link or choose another output path")
    return target


def write_text_atomic(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def named_path(path: str | Path) -> Path:
    """`path`, made absolute where its last part is no name ("." or ".."), so that it has a temporary sibling
    (`temp_path`) and can be renamed into: `--out .` is the current folder, by its own name. A symbolic link is
    followed to what it names (data on a big disk linked into a project): the output is written through it, its
    target replaced beside itself (one file system), and the link stays; a link to nothing or a loop is refused."""
    path = Path(path)
    path = Path(os.path.abspath(path)) if path.name in ("", "..") else path
    return _link_target(path) if path.is_symlink() else path


def _link_target(link: Path) -> Path:
    try:
        return Path(os.path.realpath(link, strict=True))
    except FileNotFoundError:
        raise UsageError(f"{link} is a symbolic link to {os.readlink(link)}, which does not exist: create that folder, "
                         "or choose another output path") from None
    except OSError as err:  # ELOOP: a link that leads back to itself
        raise UsageError(f"{link} is a symbolic link that cannot be followed ({err.strerror}); fix the link or choose another output path") from None


def temp_path(path: str | Path) -> Path:
    """A hidden, unique name beside `path` (same file system, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def temp_folder(path: str | Path):
    """Yield a new temp folder beside the folder output `path` (`temp_path`) to write it in and `commit` it from;
    removed on exit unless committed. This process flocks it, then marks it (TEMP_MARK, which `commit` drops), for
    as long as it writes: so a later write of `path` tells what a kill (SIGKILL, OOM) left, marked and unlocked,
    from a live write (`clear_stale_temps`, run first). Where the filesystem has no locks it is not marked."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_temps(path)
    tmp = temp_path(path)
    tmp.mkdir()
    fd = None
    try:
        fd = os.open(tmp, os.O_RDONLY)
        if _try_flock(fd) is True:  # a new folder: nobody else holds it
            (tmp / TEMP_MARK).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
    finally:
        _remove(tmp)  # before the lock goes: never marked and unlocked while this process lives
        if fd is not None:
            os.close(fd)


def clear_stale_temps(path: Path) -> list[Path]:
    """Deal with the temp folders (`.NAME.tmp-XXXXXXXX`, possibly a whole dataset each) that earlier writes of the
    folder output `path` left when killed: one marked by this host (`temp_folder`) whose writer's lock is free is
    removed, with a log line (its size); one fm cannot tell from a live write (unmarked: an older fm's, or the
    old output a kill left mid-delete; another host's; no locks) is reported with the command that removes it; a
    live one is left alone. Returns the removed ones."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-[0-9a-f]{{8}}")
    try:
        names = sorted(n for n in os.listdir(path.parent) if pattern.fullmatch(n))
    except OSError:
        return []
    removed = []
    for tmp in (path.parent / n for n in names):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        size = f"{_tree_bytes(tmp) / 1e6:.1f} MB"
        outcome = _remove_if_stale(tmp)
        if outcome == "removed":
            removed.append(tmp)
            _note(f"removed {tmp} ({size}): the temporary folder of an earlier write of {path.name} that was killed before it finished")
        elif outcome == "unknown" and str(tmp) not in _REPORTED:  # once per process (prepare-data looks before writing too)
            _REPORTED.add(str(tmp))
            _note(f"warning: {tmp} ({size}) looks like the temporary folder of an earlier write of {path.name} that was killed "
                  f"before it finished; if no fm command is writing {path} now, remove it: rm -rf {shlex.quote(str(tmp))}")
    return removed


_REPORTED: set[str] = set()  # the leftovers clear_stale_temps warned of in this process


def _remove_if_stale(tmp: Path) -> str:
    """"removed" (marked by this host, its writer's lock free: the writer is dead), "live" (locked), "gone", or
    "unknown" (no marker, another host's marker, or no locks here: not fm's to delete)."""
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return "gone"
    try:
        locked = _try_flock(fd)
        if locked is not True:
            return "live" if locked is False else "unknown"
        try:
            host = (tmp / TEMP_MARK).read_text(encoding="utf-8").split()[0]
        except (OSError, UnicodeDecodeError, IndexError):
            return "unknown"
        if host != socket.gethostname():  # a lock on a shared filesystem may be this host's alone
            return "unknown"
        shutil.rmtree(tmp, ignore_errors=True)
        return "unknown" if os.path.lexists(tmp) else "removed"  # not all of it could be removed: said, with the command
    finally:
        os.close(fd)


def _try_flock(fd: int) -> bool | None:
    """A non-blocking exclusive flock on `fd`: True taken, False held by another process, None no locks here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _note(message: str) -> None:
    from .console import stderr_console

    stderr_console().print(message, highlight=False, markup=False)


def commit(tmp: Path, path: Path, *, durable: bool = True) -> None:
    """fsync `tmp` (every file and folder in it, for a directory), rename it to `path`, fsync the parent directory.

    A directory replaces an existing one (which rename cannot do) by swapping the two in one step (`_swap_dirs`),
    so that `path` holds the old or the new one whatever stops the process; the old one is deleted only once the
    new one is in place.
    """
    _drop_mark(tmp)
    if durable:
        _fsync_tree(tmp)
    old = _swap_dirs(tmp, path) if tmp.is_dir() and path.is_dir() else None
    if old is None:
        os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
    if old is not None:
        _remove(old)


def _swap_dirs(new: Path, path: Path) -> Path:
    """Put the directory `new` in the place of the directory `path`; return where the old one is now. One atomic
    exchange where the kernel and filesystem have it (Linux renameat2); else the old one is moved aside first, and
    moved back if moving the new one in fails or is interrupted (a kill between the two renames leaves it aside)."""
    if _exchange(new, path):
        return new
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, old)
        os.replace(new, path)
    except BaseException:  # a failure or Ctrl-C between the two: the old one goes back (a signal may come after
        if os.path.lexists(old) and not os.path.lexists(path):  # either rename returned, hence the checks)
            os.replace(old, path)
        raise
    return old


@functools.lru_cache(maxsize=None)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not Linux, or a C library without it (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step (renameat2 RENAME_EXCHANGE); False where that is not supported."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):  # a filesystem (or kernel) without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _drop_mark(tmp: Path) -> None:
    """temp_folder's marker out of a folder about to be committed: the output holds only what its writer wrote."""
    if tmp.is_dir():
        (tmp / TEMP_MARK).unlink(missing_ok=True)


def commit_or_refuse(tmp: Path, path: Path, force: bool, what: str) -> None:
    """`commit` where `force` allows replacing `path`, else `commit_new`: an output that appeared at `path` after the
    up-front `refuse_existing` (another command writing it at the same time) is refused, never replaced."""
    if force:
        commit(tmp, path)
    elif not commit_new(tmp, path):
        raise UsageError(f"{path} appeared while this {what} was written (another command writing it?): nothing was replaced; "
                         "pass --force to replace it, or choose another --out")


def commit_new(tmp: Path, path: Path) -> bool:
    """`commit` that never replaces: fsync `tmp`, rename it to `path` only where nothing is there yet (a plain
    rename fails on a non-empty directory), fsync the parent. False when `path` already existed (another process,
    e.g. a DDP rank, built it first: it may be reading it now); `tmp` is then left for the caller."""
    _drop_mark(tmp)
    _fsync_tree(tmp)
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.exists():
            raise
        return False
    fsync_dir(path.parent)
    return True


def _fsync_tree(tmp: Path) -> None:
    """fsync a file, or every file and folder in a directory and the directory itself (a file's name is durable
    only once its folder is: a subfolder's too), before it is renamed into place."""
    for p in [tmp] if tmp.is_file() else [*tmp.rglob("*"), tmp]:
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)


def refuse_existing(paths, force: bool, *, folders: bool = False) -> None:
    """Never replace a user's file silently: an output that exists needs `--force` (docs/architecture.md section 10);
    and an output must be writable where it goes, checked now rather than after the work.

    `paths` is one path or several (e.g. the files `fm sample --out DIR` would write); None entries are
    ignored; `folders` says they are folders (a dataset), not files. Run it before any work, so a refusal
    costs nothing and leaves nothing behind.
    """
    candidates = [paths] if isinstance(paths, (str, Path)) or paths is None else list(paths)
    by_folder: dict[Path, list[str]] = {}
    for p in candidates:
        if p is not None:
            by_folder.setdefault(Path(p).parent, []).append(Path(p).name)
    existing = []
    for folder, names in by_folder.items():  # one listing per folder: `fm sample -n 1000000` names a million files
        present = set(os.listdir(folder)) if folder.is_dir() else set()
        existing += [folder / n for n in names if n in present]
    for path in existing:  # not even --force replaces a folder by a file or a file by a folder (the rename fails)
        if path.is_dir() != folders:
            what, other = ("a file", "a folder") if folders else ("a folder", "a file")
            raise UsageError(f"{path} is {what}, and {other} would be written there; choose another output path")
    if existing and not force:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]} already exists{more}; pass --force to replace it")
    for folder in by_folder:
        refuse_unwritable(folder)


def refuse_unreplaceable_folder(path: Path, what: str, marker: str, ours: Callable[[str], bool]) -> None:
    """--force replaces the folder `path` only when it is empty, or an earlier `what` (it holds the file `marker`) in
    which every entry is one fm writes there (`ours(name)`): a file of the user's inside it would be deleted with it.
    Anything else is refused in one line (the first few foreign entries named), before any work."""
    if (path / marker).is_file():
        foreign = sorted(p.name for p in path.iterdir() if not ours(p.name))
        if foreign:
            raise UsageError(f"refusing to replace {path}: besides {what} it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                             "which --force would delete; move them out or choose another --out")  # fmt: skip
    elif any(path.iterdir()):
        raise UsageError(f"refusing to replace {path}: it is not {what} (no {marker}) nor empty; choose another --out")


def refuse_unwritable(folder: str | Path) -> None:
    """`folder` can be created (or is there) and written: its nearest existing ancestor is a writable folder."""
    folder = Path(folder)
    there = _nearest_existing(folder)
    if not there.is_dir():
        raise UsageError(f"cannot write into {folder}: {there} is a file, not a folder; choose another output path")
    if not _can_create_file_in(there):
        raise UsageError(f"cannot write into {folder}: {there} is not writable (permission denied); choose another output path")


def can_write_in(folder: str | Path) -> bool:
    """Whether files can be created in `folder`, or in it once made: its nearest existing ancestor is a folder
    a file can be created in. Nothing is left behind (a missing `folder` is not made)."""
    there = _nearest_existing(Path(folder))
    return there.is_dir() and _can_create_file_in(there)


def _nearest_existing(path: Path) -> Path:
    return next(p for p in [path, *path.parents] if p.exists() or p == Path(p.anchor) or p == Path("."))


def _can_create_file_in(folder: Path) -> bool:
    """Found by creating and removing a file: mode bits (os.access) say nothing for root, and a read-only mount
    or an ACL can refuse what they allow."""
    probe = temp_path(folder / "write-probe")
    try:
        probe.touch(exist_ok=False)
    except OSError:
        return False
    probe.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path):
    """A blocking advisory flock on `folder` itself (created if missing; no lock file left behind) for a
    check-then-create that concurrent fm processes share (the default shapes data, the probe cache): released
    when the block ends or the process dies. Where the folder cannot be made or locked, nothing is locked."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        flock_exclusive(fd, wait=True)
        yield
    finally:
        os.close(fd)


def flock_exclusive(fd: int, wait: bool) -> bool:
    """An exclusive advisory flock on the open `fd` (released when it is closed, or the process ends): False only
    when another process holds it and `wait` is off; True when taken, or where the filesystem has no locks (some
    network mounts: the caller goes unlocked)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:
        pass
    return True


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (the directory entry itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)
