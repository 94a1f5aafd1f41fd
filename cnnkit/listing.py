"""Finding the image files under a folder, in a deterministic order. Torch-free.

`list_images` returns the whole sorted listing; `iter_images` yields the same files in the same order
as the walk goes, so `cnnkit infer` streams folders of any size. What the walk leaves out is
counted or reported, never silently dropped. (`list_pngs` and `iter_pngs` are their older names.)

A file is listed by its name (`IMAGE_SUFFIXES`, any case); what it holds is decided by its bytes when
it is decoded (`cnnkit.formats.sniff`: a `.png` holding JPEG bytes decodes as a JPEG).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from cnnkit.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_EXTENSIONS = frozenset(suffix[1:] for suffix in IMAGE_SUFFIXES)


def is_image_name(name: str) -> bool:
    """Whether `name` ends with one of `IMAGE_SUFFIXES`, in any case."""
    dot = name.rfind(".")
    return dot >= 0 and name[dot + 1 :].lower() in _EXTENSIONS


def is_listed(root: str, path: str, existing: bool = True) -> bool:
    """Whether `path` is an existing file the walk of `root` yields (or, with `existing=False`, would
    be one if it were written): an image-named file under it, in no hidden folder (symlinks resolved, so
    it may answer yes for a file the walk reaches no other way: callers use it to refuse writing there)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        return False
    if existing and not os.path.isfile(real):
        return False
    parts = os.path.relpath(real, real_root).split(os.sep)
    return is_image_name(parts[-1]) and not any(p.startswith(".") for p in parts)


# Entries a listing leaves out on purpose, counted so that nothing vanishes without a word.
OTHER_FILES, HIDDEN, SYMLINKED_FOLDERS = "other_files", "hidden", "symlinked_folders"
_IGNORED_WORDS = {
    OTHER_FILES: ("non-image file", "non-image files"),
    HIDDEN: ("hidden entry", "hidden entries"),
    SYMLINKED_FOLDERS: ("symlinked folder (not entered)", "symlinked folders (not entered)"),
}


@dataclass
class Listing:
    """The image files under a folder, in a deterministic order, and what else was there.

    Attributes:
        root: the folder.
        files: paths relative to root, sorted; "/"-separated. Regular files, or symlinks to them.
        skipped: (relative path, reason) for entries named like images that cannot be read (dangling
            symlink, symlink loop, FIFO, device, socket, unreadable) and for unreadable folders.
        ignored: how many entries were left out on purpose, by kind: `other_files` (names without an
            image extension), `hidden` (names starting with "."; folders not entered),
            `symlinked_folders` (not entered).
        png_folders: folders named like an image (searched like any other folder).
    """

    root: str
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)
    png_folders: list[str] = field(default_factory=list)


def describe_ignored(ignored: dict[str, int]) -> str:
    """E.g. "3 non-image files, 1 hidden entry"; "" when nothing was ignored."""
    parts = [f"{n:,} {_IGNORED_WORDS[k][n != 1]}" for k, n in ignored.items() if n]
    return ", ".join(parts)


def _not_a_file(entry: os.DirEntry[str]) -> str | None:
    """Why an image-named entry that is not a regular file cannot be read; None for a symlinked folder."""
    import errno
    import stat

    try:
        mode = os.stat(entry.path).st_mode
    except OSError as e:
        if entry.is_symlink():
            if e.errno == errno.ELOOP:
                return "symlink loop"
            if e.errno == errno.ENOENT:
                return "dangling symlink"
        return f"unreadable: {e.strerror}"
    if stat.S_ISDIR(mode):
        return None
    kind = (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "special file"
    )
    return f"not a regular file ({kind})"


def list_images(root: str) -> Listing:
    """Walk `root` recursively for image files (`IMAGE_SUFFIXES`, any case).

    Symlinks to files are followed; symlinked folders are not entered (no cycles) and are counted.
    Hidden files and folders (names starting with ".") are skipped, as `ls` does, and counted; so
    are files without an image extension. A dangling symlink, a symlink loop or a special file named
    like an image is reported in `skipped`, never fatal. Names that are not valid UTF-8 come back
    surrogate-escaped (`os.fsdecode`), so they still open and sort; writers must encode them with
    `errors="surrogateescape"` (see `cnnkit.runtime.infer`).
    """
    listing = Listing(root=root, files=[])
    listing.files = list(iter_images(root, listing))
    return listing


def iter_images(root: str, listing: Listing | None = None) -> Iterator[str]:
    """The files of `list_images(root)`, in the same order, yielded one by one as the walk goes.

    Memory holds the sorted entries of the folders on the current path only (the largest folder, not
    the whole tree), so `cnnkit infer` streams a folder of any size. Same rules as `list_images`; when
    `listing` is given, its `skipped`, `ignored` and `png_folders` are filled as folders are read
    (its `files` are left alone).

    Order: each folder's entries are sorted with "/" appended to sub-folder names, and a sub-folder
    is walked where it sorts. That is exactly the order of the sorted full relative paths (the
    order of `list_images`), also where names hold characters that sort before "/" (" ", "-", "."):
    "a-b/x.png" < "a.png" < "a/x.png", where a plain sort per folder would walk "a/" first.
    """
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such folder")
    if listing is None:
        listing = Listing(root=root, files=[])
    for key in (OTHER_FILES, HIDDEN, SYMLINKED_FOLDERS):
        listing.ignored.setdefault(key, 0)
    return _walk_sorted(root, listing)


def _walk_sorted(root: str, listing: Listing) -> Iterator[str]:
    stack = [iter(_sorted_entries(root, "", listing))]
    while stack:
        for key in stack[-1]:
            if key[-1] == "/":  # a folder: walk it now, then go on with this one
                stack.append(iter(_sorted_entries(root, key[:-1], listing)))
                break
            yield key
        else:
            stack.pop()


def _sorted_entries(root: str, rel: str, listing: Listing) -> list[str]:
    """The image files ("rel/name") and sub-folders ("rel/name/") of one folder, sorted; the rest is
    counted or reported in `listing` as `list_images` does."""
    out: list[str] = []
    try:
        it = os.scandir(os.path.join(root, rel) if rel else root)
    except OSError as e:
        listing.skipped.append((rel or ".", f"unreadable folder: {e.strerror}"))
        return out
    ignored = listing.ignored
    with it:
        for entry in it:
            name = entry.name
            if name.startswith("."):
                ignored[HIDDEN] += 1
                continue
            path = f"{rel}/{name}" if rel else name
            image = is_image_name(name)
            try:
                if entry.is_dir(follow_symlinks=False):
                    if image:
                        listing.png_folders.append(path)
                    out.append(path + "/")
                    continue
                if image and entry.is_file(follow_symlinks=True):
                    out.append(path)
                    continue
                if not image:
                    ignored[SYMLINKED_FOLDERS if entry.is_symlink() and entry.is_dir() else OTHER_FILES] += 1
                    continue
            except OSError:
                if not image:
                    ignored[OTHER_FILES] += 1
                    continue
            why = _not_a_file(entry)
            if why is None:
                ignored[SYMLINKED_FOLDERS] += 1
            else:
                listing.skipped.append((path, why))
    out.sort()
    return out


# The names most callers know them by.
list_pngs = list_images
iter_pngs = iter_images


def class_of(rel: str) -> str | None:
    """The class a file belongs to by its folder: the first path component, if any."""
    head, sep, _ = rel.partition("/")
    return head if sep else None
