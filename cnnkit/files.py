"""Atomic file writes: a crash or a kill leaves the previous file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from typing import Any

from cnnkit.errors import DataError, ModelError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def check_output_target(path: str | os.PathLike[str]) -> None:
    """Refuse to replace anything but a regular file: an output goes to a new path or over a file.

    Raises:
        DataError: `path` (or what its symlink points at) is a folder, device, FIFO or socket, in one line.
    """
    try:
        mode = os.stat(path).st_mode  # follows a symlink: /dev/stdout -> a terminal is a device
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as e:
        raise DataError(f"{os.fspath(path)}: cannot write there ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = _mode_kind(mode)
        raise DataError(
            f"{os.fspath(path)}: is {kind}; cnnkit writes only a new file or over a regular file "
            "(choose another output path)"
        )


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail now, in one line, where writing `path` later would fail: called on every output of a
    command before its work starts, so a long run does not end in an error or leave some outputs
    written and others not.

    Raises:
        DataError: `path` is not a regular file (`check_output_target`), or its nearest existing
            parent is not a folder or cannot be written in.
    """
    check_output_target(path)
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):  # makedirs will create the rest
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise DataError(
            f"{os.fspath(path)}: cannot write there ({ancestor} is not a folder; choose another output path)"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):  # root passes this except on a read-only file system
        raise DataError(
            f"{os.fspath(path)}: cannot write there (no permission to write in {ancestor}, or it is "
            "on a read-only file system; choose another output path)"
        )


def check_outside(outputs: Iterable[str | os.PathLike[str]], folder: str | os.PathLike[str], role: str) -> None:
    """Refuse an output inside `folder`, a folder the command reads (`role` says how, in the message):
    it could replace one of its files, and the next run would read it as data.

    Raises:
        DataError: an output is `folder` or lies under it (symlinks resolved), in one line.
    """
    root = os.path.realpath(folder)
    for out in outputs:
        where = os.path.realpath(out)
        if os.path.commonpath([root, where]) == root:
            raise DataError(
                f"{os.fspath(out)}: is inside {os.fspath(folder)}, {role}; writing there could destroy "
                "a file of it and would add one to it (choose another output path)"
            )


def check_not_an_input(outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse to write an output over one of the command's own inputs (a model, a checkpoint, an image, a
    shard CSV): the same file however it is named (relative, through a symlink, a hard link).

    Raises:
        DataError: an output is an input, in one line naming both.
    """
    seen: dict[tuple[int, int], str] = {}
    for src in inputs:
        with contextlib.suppress(OSError, ValueError):  # a missing input cannot be destroyed
            st = os.stat(src)
            seen.setdefault((st.st_dev, st.st_ino), os.fspath(src))
    for out in outputs:
        try:
            st = os.stat(out)
        except (OSError, ValueError):  # a new file
            continue
        found = seen.get((st.st_dev, st.st_ino))
        if found is not None:
            same = "" if os.path.abspath(found) == os.path.abspath(out) else f" ({found})"
            raise DataError(
                f"{os.fspath(out)}: is an input of this command{same}; writing there would destroy "
                "it (choose another output path)"
            )


# An error of these kinds while the body of `atomic_path` writes its temporary file is about the output.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _cannot_write(path: str, e: OSError) -> DataError:
    return DataError(f"{path}: cannot write ({e.strerror or e}); nothing was written there")


def path_kind(path: str | os.PathLike[str]) -> str:
    """What is at `path`, in words ("a file", "a folder", "a FIFO", "nothing", ...), from stat alone:
    nothing is opened, so a FIFO cannot block the caller."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if os.path.islink(path) else "nothing"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return _mode_kind(mode)


def _mode_kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_model_file(path: str | os.PathLike[str], what: str, hint: str) -> None:
    """Refuse, in one line that says what is there instead, a model path that is not a regular file.

    Args:
        what: the kind of file expected, e.g. "ONNX model file".
        hint: how to make one, e.g. "export one with `cnnkit export --format onnx`".

    Raises:
        ModelError: nothing at `path`, or a folder, FIFO, device, socket or broken link.
    """
    kind = path_kind(path)
    if kind == "a file":
        return
    said = f"no such {what}" if kind == "nothing" else f"is {kind}, not a {what}"
    raise ModelError(f"{os.fspath(path)}: {said} ({hint})")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    `path` must be absent or a regular file (`check_output_target`), checked before and again just
    before the rename: `--output /dev/null` must not replace the device with a file.

    On an exception (Ctrl-C and SIGTERM included, which the CLI turns into one) the temporary file
    is removed and `path` is untouched. An OSError of the write itself (the parent is a file, a
    read-only folder, a full disk) becomes a one-line `DataError` naming `path`.
    A process killed outright (SIGKILL, power loss) cannot clean up: its temporary file stays as
    the hidden `.<name>.<pid>.<random>.tmp`, `path` itself still untouched, and the next write of
    the same `path` removes it (`remove_stale_temps`).
    """
    path = os.fspath(path)
    check_output_target(path)
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(path)
    except OSError as e:
        raise _cannot_write(path, e) from None
    prefix = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.")
    tmp = ""
    try:
        # The name is chosen before the file is made, inside the `try`: a Ctrl-C or SIGTERM arriving
        # just after the file exists still reaches the cleanup below (tempfile.mkstemp returns the
        # name only after Python code that a signal can interrupt).
        while True:
            tmp = f"{prefix}{secrets.token_hex(4)}.tmp"
            try:  # mode 0666 less the umask, as a plain open() gives: outputs are meant to be shared
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
                break
            except FileExistsError:
                continue
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        check_output_target(path)  # again: it may have appeared while the work ran
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # Only errors of writing the output: an OSError reading an input keeps its own message.
        if isinstance(e, OSError) and (e.filename in (tmp, path) or e.errno in _FULL):
            raise _cannot_write(path, e) from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process, or not a pid
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[str]:
    """Remove temporary files that killed writers of `path` left behind (see `atomic_path`).

    Only files named `.<name>.<pid>.<random>.tmp` whose process no longer runs on this machine are
    removed: a concurrent writer's file is left alone.

    Returns:
        The paths removed.
    """
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    prefix = f".{os.path.basename(path)}."
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix) and n.endswith(".tmp")]
    except OSError:
        return removed
    for name in names:
        parts = name[len(prefix) : -len(".tmp")].split(".")  # <pid>.<random>, nothing else
        if len(parts) == 2 and parts[0].isdigit() and not _alive(int(parts[0])):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(parent, name))
                removed.append(os.path.join(parent, name))
    return removed


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def default_cache_dir() -> str:
    """cnnkit's own folder for downloads and its signing key: `$CNNKIT_CACHE` if set, else `~/.cache/cnnkit`."""
    return os.environ.get("CNNKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "cnnkit")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def point_symlink(link: str | os.PathLike[str], target: str) -> None:
    """Make `link` a symlink to `target`, replacing an existing one atomically (nothing left behind
    when that fails)."""
    link = os.fspath(link)
    tmp = f"{link}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
