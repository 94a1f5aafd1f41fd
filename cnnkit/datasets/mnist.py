"""The lecture's MNIST archive (70,000 PNGs, fast.ai's `mnist_png.tgz`): download, verify, extract.

The download is cached (`$CNNKIT_CACHE`, default `~/.cache/cnnkit`), resumable (HTTP Range on a
`.part` file) and checked against a known size and MD5 before use. Extraction refuses any archive
member that is not a plain file or folder inside the destination. Without a network, the same
commands run on the bundled sample (`cnnkit data sample`) or on IDX files (`cnnkit data idx`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib

from cnnkit.console import Progress, log
from cnnkit.datasets.layout import MNIST_DIR, TEST_SPLIT, TRAIN_SPLIT, Splits, find_splits, make_temp_dir
from cnnkit.errors import DataError, DownloadError
from cnnkit.files import default_cache_dir
from cnnkit.version import __version__

MNIST_URL = "https://s3.amazonaws.com/fast-ai-imageclas/mnist_png.tgz"
MNIST_SIZE = 15_683_414
MNIST_MD5 = "03639f83c4e3d19e0a3a53a8a997c487"

OFFLINE_HINT = (
    "offline alternatives: `cnnkit data sample` (bundled 5,000 digits) or "
    "`cnnkit data idx IMAGES LABELS --out DIR --split training|testing`"
)
_BLOCK = 1 << 20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


# --------------------------------------------------------------------------------------------
# Download


def _one_line(x: object) -> str:
    return " ".join(str(x).split())


def _md5(path: str) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _verify(path: str, size: int | None, md5: str | None) -> str | None:
    """None if the file matches, else why not."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"{actual:,} bytes instead of {size:,}"
    if md5 is not None and (digest := _md5(path)) != md5.lower():
        return f"MD5 {digest} instead of {md5.lower()}"
    return None


def download(url: str, dest: str, size: int | None, md5: str | None, timeout: float = 30.0) -> str:
    """Download `url` to `dest`, resuming a partial download and verifying the result.

    The data goes to `dest + ".part"`; a `.part` left by an interrupted run is resumed with an HTTP
    Range request when the server answers 206 (and restarted from zero when it sends the whole file).
    The file is renamed to `dest` only once its size and MD5 match. A `dest` that already matches is
    returned without touching the network.

    Args:
        url: http(s) URL.
        dest: where the verified file goes.
        size: expected size in bytes, or None not to check it.
        md5: expected MD5 (hex), or None not to check it.
        timeout: seconds without an answer before giving up, per connection attempt and per read.

    Returns:
        `dest`.

    Raises:
        DownloadError: network or HTTP failure (the `.part` is kept for the next try), or a file
            that does not verify (then it is removed).
    """
    if os.path.isfile(dest):
        if _verify(dest, size, md5) is None:
            return dest
        log(f"{dest} does not verify; downloading it again")
        os.remove(dest)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    if size is not None and have >= size:
        # Complete already (verified below) or longer than it should be (restart).
        if have > size:
            os.remove(part)
            have = 0
    if size is None or have < size:
        _fetch(url, part, have, size, timeout)

    problem = _verify(part, size, md5)
    if problem is not None:
        os.remove(part)
        raise DownloadError(
            f"{url}: the download does not verify ({problem}) and was removed; run the command again, "
            f"or use the {OFFLINE_HINT}"
        )
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return dest


def _network_error(url: str, e: BaseException, interrupted: bool = False) -> DownloadError:
    if isinstance(e, urllib.error.HTTPError):
        return DownloadError(f"{url}: the server answered HTTP {e.code} {_one_line(e.reason)}; {OFFLINE_HINT}")
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    why = _one_line(reason) or type(reason).__name__
    if interrupted:
        return DownloadError(
            f"{url}: the download was interrupted ({why}); run the command again to resume, or use the {OFFLINE_HINT}"
        )
    return DownloadError(f"cannot download {url}: the network is unreachable ({why}); {OFFLINE_HINT}")


# What urllib and http.client raise when the network or the server fails (OSError covers socket
# errors, timeouts and refused connections; HTTPException covers cut-off bodies and bad answers).
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


def _open(url: str, start: int, timeout: float) -> http.client.HTTPResponse:
    req = urllib.request.Request(url, headers={"User-Agent": f"cnnkit/{__version__}"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not start:
            raise
        # 416: the server cannot serve the range asked for (the .part is stale): start over.
        e.close()
        return _open(url, 0, timeout)


def _fetch(url: str, part: str, have: int, size: int | None, timeout: float) -> None:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http and https URLs can be downloaded")
    try:
        resp = _open(url, have, timeout)
    except _NETWORK_ERRORS as e:
        raise _network_error(url, e) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the Range header (or the .part was stale): whole file again
        elif have and not (resp.headers.get("Content-Range") or "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{url}: the server answered another range than asked; run the command again")
        length = resp.headers.get("Content-Length")
        end = have + int(length) if length and length.isdigit() else None
        total = size if size is not None else end
        name = os.path.basename(urllib.parse.urlsplit(url).path) or url
        try:
            f = open(part, "ab" if have else "wb")
        except OSError as e:
            raise DownloadError(f"{part}: cannot write the download ({e.strerror or e})") from None
        with f, Progress(total, f"downloading {name}", unit="B") as bar:
            bar.n = have  # resumed bytes count toward the bar
            while True:
                try:
                    block = resp.read(_BLOCK)
                except _NETWORK_ERRORS as e:
                    raise _network_error(url, e, interrupted=True) from None
                if not block:
                    break
                try:
                    f.write(block)
                except OSError as e:
                    raise DownloadError(f"{part}: cannot write the download ({e.strerror or e})") from None
                bar.update(len(block))
                if size is not None and bar.n > size:
                    break  # more than the file should hold: it fails verification
        # http.client ends a body cut short by the server as if it were complete: compare the
        # length announced (or known), and keep the .part for the next run to resume.
        expected = end if end is not None else size
        if expected is not None and bar.n < expected:
            why = f"connection closed after {bar.n:,} of {expected:,} bytes"
            raise _network_error(url, ConnectionError(why), interrupted=True)


# --------------------------------------------------------------------------------------------
# Extraction


def _check_member(m: tarfile.TarInfo, archive: str) -> list[str]:
    """The member's path components, or DataError if it is not a plain file or folder inside."""
    name = m.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: refusing member {name!r} with an absolute path; the archive is not safe")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts or "\0" in name:
        raise DataError(f"{archive}: refusing member {name!r} that points outside the folder; the archive is not safe")
    if not (m.isreg() or m.isdir()):
        kind = "link" if (m.issym() or m.islnk()) else "device or fifo" if m.isdev() else "special file"
        raise DataError(f"{archive}: refusing member {name!r} ({kind}); only plain files and folders are extracted")
    return parts


def _copy_member(tar: tarfile.TarFile, m: tarfile.TarInfo, target: str, archive: str) -> None:
    src = tar.extractfile(m)
    assert src is not None  # regular members always have data
    fd = os.open(target, _CREATE, 0o666)  # O_EXCL: a duplicate member name is an error, not an overwrite
    try:
        with src:
            left = m.size
            while left > 0:
                block = src.read(min(left, _BLOCK))
                if not block:
                    raise DataError(f"{archive}: member {m.name!r} is cut short; download it again")
                if os.write(fd, block) != len(block):
                    raise OSError(errno.EIO, "short write (disk full?)", target)
                left -= len(block)
    finally:
        os.close(fd)


def _extract_members(tar: tarfile.TarFile, root: str, archive: str, max_bytes: int) -> None:
    """Write every member of `tar` under `root`, checking each as it comes.

    Not `tar.extractall(filter="data")`: that filter strips a leading "/" and keeps links that stay
    inside the folder, where cnnkit refuses the whole archive (a dataset has no reason for either),
    and it has no total-size cap.
    """
    total = 0
    made = {root}
    for m in tar:
        # No symlink is ever created, so once ".." and absolute names are refused the joined path
        # is inside `root`: a string check suffices (realpath would cost one lstat per path
        # component per member, a third of the time for MNIST).
        target = os.path.join(root, *_check_member(m, archive))
        folder = target if m.isdir() else os.path.dirname(target)
        if folder not in made:
            os.makedirs(folder, exist_ok=True)
            made.add(folder)
        if m.isdir():
            continue
        total += m.size
        if total > max_bytes:
            raise DataError(f"{archive}: holds more than {max_bytes:,} bytes; refusing to extract it")
        _copy_member(tar, m, target, archive)


def safe_extract(archive: str, dest: str, max_bytes: int = 4 << 30) -> str:
    """Extract a tar archive (any compression) to `dest`, refusing anything that is not safe.

    Only regular files and folders are written, with this process's default permissions. Members
    with absolute paths or `..` components, links, devices and fifos make the whole archive refused.
    Everything is extracted into a temporary folder next to `dest` and renamed into place at the
    end, so `dest` appears complete or not at all.

    Args:
        archive: the .tar / .tgz / .tar.gz / .tar.bz2 / .tar.xz file.
        dest: the folder to create; it must not exist.
        max_bytes: refuse archives whose files add up to more (decompression bombs).

    Returns:
        `dest`.

    Raises:
        DataError: `dest` exists, the archive is unreadable, or it holds a member refused above.
    """
    if os.path.lexists(dest):
        raise DataError(f"{dest} exists already; remove it or extract elsewhere")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, os.path.basename(os.path.abspath(dest)))
    root = os.path.realpath(tmp)
    try:
        try:
            # Members are checked as they come and read in order, so the compressed data is read
            # once. Random-access mode ("r:*", not the stream mode "r|*") because only it notices
            # a gzip stream cut short between two members.
            with tarfile.open(archive, "r:*") as tar:
                _extract_members(tar, root, archive, max_bytes)
        except FileExistsError as e:
            raise DataError(f"{archive}: member {e.filename!r} appears twice or clashes with a folder") from None
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise DataError(f"{archive}: not a readable tar archive ({_one_line(e)}); download it again") from None
        except OSError as e:
            if e.filename is None:  # from reading the archive (e.g. gzip.BadGzipFile)
                raise DataError(f"{archive}: not a readable tar archive ({_one_line(e)})") from None
            raise DataError(f"{e.filename}: cannot extract ({e.strerror or e})") from None
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --------------------------------------------------------------------------------------------
# The lecture's dataset


def _complete(out: str) -> bool:
    return os.path.isdir(os.path.join(out, TRAIN_SPLIT)) and os.path.isdir(os.path.join(out, TEST_SPLIT))


def fetch_mnist(
    out: str = MNIST_DIR,
    url: str = MNIST_URL,
    cache_dir: str | None = None,
    md5: str | None = MNIST_MD5,
    size: int | None = MNIST_SIZE,
) -> Splits:
    """Download (once) and extract the lecture's MNIST PNGs as `out/training/<digit>/*.png` and `out/testing/...`.

    Args:
        out: the dataset folder; if it holds both splits already, nothing is done.
        url: the archive; it unpacks to `mnist_png/{training,testing}/<digit>/*.png` (or to
            `{training,testing}/...` directly).
        cache_dir: where the archive is kept; default `$CNNKIT_CACHE` or `~/.cache/cnnkit`.
        md5: the archive's expected MD5, or None not to check it (archives other than the default).
        size: the archive's expected size in bytes, or None not to check it.

    Returns:
        The split folders.

    Raises:
        DownloadError: the archive cannot be downloaded or does not verify (the message names the
            offline alternatives).
        DataError: the archive is unsafe or has another layout, or `out` holds something else.
    """
    if _complete(out):
        return find_splits(out)
    if os.path.isdir(out) and os.listdir(out):
        raise DataError(f"{out} exists but does not hold training/ and testing/; remove it or pass another --out")
    if os.path.lexists(out) and not os.path.isdir(out):
        raise DataError(f"{out} exists and is not a folder; remove it or pass another --out")

    cache = cache_dir or default_cache_dir()
    name = os.path.basename(urllib.parse.urlsplit(url).path) or "mnist_png.tgz"
    archive = download(url, os.path.join(cache, name), size=size, md5=md5)

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.", suffix=".tmp", dir=parent)
    try:
        log(f"extracting {archive} to {out}")
        unpacked = safe_extract(archive, os.path.join(work, "x"))
        root = os.path.join(unpacked, "mnist_png")
        if not _complete(root):
            root = unpacked
        if not _complete(root):
            raise DataError(
                f"{archive}: expected mnist_png/training/ and mnist_png/testing/ inside; is it the MNIST archive?"
            )
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(out)  # an empty folder left by the user; anything else was refused above
        os.replace(root, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return find_splits(out)
