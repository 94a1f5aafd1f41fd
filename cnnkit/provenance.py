"""Which model files cnnkit wrote itself, so that code-bearing ones are loaded only then (torch-free).

TorchScript (`.ts`) and torch.export (`.pt2`) files are programs: `torch.jit.load` and
`torch.export.load` (which falls back to `weights_only=False` pickles) can run code from the file.
A run folder is not a trusted place (a file can be dropped or swapped there), so cnnkit loads such a
file only when it can prove it wrote it, or when the user says to trust it (`--trust-model`).

The proof: when `cnnkit export` writes an artifact it records, in `cnnkit-manifest.json` beside it,
the file's SHA-256 and an HMAC-SHA256 of that digest under a secret key kept in this user's cnnkit
folder (`$CNNKIT_CACHE/signing.key`, mode 0600, made on first use). Whoever can write the run folder
but not that key cannot forge an entry, and a file changed after export no longer matches its
digest. A model exported on another machine (another key) is therefore not proven here: pass
`--trust-model` if you trust where it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets

from cnnkit.errors import DataError
from cnnkit.files import default_cache_dir, write_json

MANIFEST_NAME = "cnnkit-manifest.json"
MANIFEST_FORMAT = "cnnkit.manifest/1"
KEY_NAME = "signing.key"
MAX_MANIFEST_BYTES = 1 << 20


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key_path() -> str:
    return os.path.join(default_cache_dir(), KEY_NAME)


def _key(create: bool) -> bytes | None:
    """This user's signing key; None when there is none and `create` is False.

    Raises:
        DataError: the key file is damaged (under 32 bytes), readable or writable by others, or
            cannot be made (its folder is a file, no permission).
    """
    path = _key_path()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        if not create:
            return None
        return _new_key(path)
    except OSError as e:
        raise DataError(
            f"{path}: cannot read cnnkit's signing key ({e.strerror or e}); set CNNKIT_CACHE to a folder of your own"
        ) from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        key = f.read(4096)
    if mode & 0o077:  # a key others can read lets them sign files; one they can write lets them replace it
        raise DataError(
            f"{path}: cnnkit's signing key is open to other users (mode {mode & 0o777:o}); "
            f"`chmod 600 {path}`, or remove it to make a new one"
        )
    if len(key) < 32:
        raise DataError(
            f"{path}: cnnkit's signing key is damaged ({len(key)} bytes); remove it to make a new "
            "one (files exported before are then no longer proven here)"
        )
    return key


def _new_key(path: str) -> bytes:
    key = secrets.token_bytes(32)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _key(create=False) or key
    except OSError as e:
        raise DataError(
            f"{path}: cannot make cnnkit's signing key ({e.strerror or e}); set CNNKIT_CACHE to a folder of your own"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return key


def check_key() -> None:
    """Make sure a signing key can be read or made, before an export does any work (DataError if not)."""
    _key(create=True)


def _tag(key: bytes, name: str, digest: str) -> str:
    return hmac.new(key, f"{name}\0{digest}".encode(), hashlib.sha256).hexdigest()


def _read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST_NAME)
    with contextlib.suppress(OSError, ValueError):
        if os.path.isfile(path) and os.path.getsize(path) <= MAX_MANIFEST_BYTES:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT and isinstance(doc.get("files"), dict):
                return doc
    return {"format": MANIFEST_FORMAT, "files": {}}


def record(path: str, digest: str | None = None) -> None:
    """Record `path` (a file cnnkit just wrote) in its folder's manifest, keyed with this user's secret.

    `digest`: the SHA-256 of the bytes cnnkit checked before renaming them onto `path`; when given, the
    entry vouches for those bytes only, so a file swapped in after the check is not proven.
    """
    key = _key(create=True)
    assert key is not None  # _key(create=True) returns a key or raises
    folder, name = os.path.split(os.path.abspath(path))
    digest = digest or sha256_file(path)
    doc = _read_manifest(folder)
    doc["files"][name] = {"sha256": digest, "bytes": os.path.getsize(path), "hmac": _tag(key, name, digest)}
    write_json(os.path.join(folder, MANIFEST_NAME), doc)


def read_proven(path: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) when cnnkit can prove it wrote `path`, else (None, the reason in words).

    The bytes are read once and checked: load from them, never from `path` again, or a file swapped in
    after the check would be loaded instead.
    """
    folder, name = os.path.split(os.path.abspath(path))
    entry = _read_manifest(folder)["files"].get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None, f"not written by `cnnkit export` here (no entry in {MANIFEST_NAME})"
    key = _key(create=False)
    if key is None or not hmac.compare_digest(str(entry.get("hmac", "")), _tag(key, name, entry["sha256"])):
        return None, f"its {MANIFEST_NAME} entry was not made with this user's cnnkit key (another machine, or forged)"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return None, "changed since `cnnkit export` wrote it (SHA-256 differs from the manifest)"
    return data, None
