"""cnnkit.datasets: PNG encoding, IDX reading, the bundled sample, layouts, download and extraction."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import socket
import struct
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyspng
import pytest
from PIL import Image

from cnnkit.datasets import idx, layout, mnist, sample
from cnnkit.datasets.layout import Splits, encode_png, find_splits, write_tree
from cnnkit.errors import DataError, DownloadError


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def _png(path) -> np.ndarray:
    with open(path, "rb") as f:
        return pyspng.load(f.read())


# --------------------------------------------------------------------------------------------
# encode_png / write_tree


@pytest.mark.parametrize("shape", [(1, 1), (28, 28), (5, 300), (129, 7), (64, 64)])
def test_encode_png_round_trips_through_pyspng_and_pillow(shape):
    rng = np.random.default_rng(sum(shape))
    for img in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)):
        data = encode_png(img)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        np.testing.assert_array_equal(pyspng.load(data), img)
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # Pillow verifies the chunk CRCs while loading
            assert im.mode == "L"
            np.testing.assert_array_equal(np.asarray(im), img)


def test_encode_png_has_valid_crcs():
    import zlib

    data = encode_png(np.arange(12, dtype=np.uint8).reshape(3, 4))
    pos, kinds = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        kinds.append(kind)
        pos += 12 + n
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


def test_encode_png_refuses_other_arrays():
    for bad in (np.zeros((2, 2), np.uint16), np.zeros((2, 2, 3), np.uint8), np.zeros((0, 4), np.uint8)):
        with pytest.raises(ValueError):
            encode_png(bad)


def test_write_tree_layout_names_and_values(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 5, 7), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0])
    n = write_tree(str(tmp_path), "training", images, labels, ["a", "b", "c", "empty"])
    assert n == 12
    root = tmp_path / "training"
    assert sorted(os.listdir(root)) == ["a", "b", "c", "empty"]
    assert sorted(os.listdir(root / "a")) == ["00000.png", "00003.png", "00006.png", "00009.png", "00011.png"]
    assert os.listdir(root / "empty") == []
    for i, lab in enumerate(labels):
        np.testing.assert_array_equal(_png(root / "abc"[lab] / f"{i:05d}.png"), images[i])
    assert sorted(os.listdir(tmp_path)) == ["training"]  # no temporary folder left
    assert _mode(root) == _mode(root / "a") == _umask_mode()  # not mkdtemp's 0700


def test_write_tree_refuses_existing_split_unless_overwrite(tmp_path):
    images = np.zeros((2, 3, 3), np.uint8)
    write_tree(str(tmp_path), "testing", images, np.array([0, 1]), ["x", "y"])
    with pytest.raises(DataError, match="exists already; pass another --out or remove it"):
        write_tree(str(tmp_path), "testing", images + 7, np.array([0, 1]), ["x", "y"])
    assert _png(tmp_path / "testing/x/00000.png").max() == 0  # untouched
    write_tree(str(tmp_path), "testing", images + 7, np.array([1, 1]), ["x", "y"], overwrite=True)
    assert os.listdir(tmp_path / "testing/x") == []
    assert _png(tmp_path / "testing/y/00000.png").min() == 7
    assert sorted(os.listdir(tmp_path)) == ["testing"]


def test_write_tree_leaves_nothing_on_failure(tmp_path, monkeypatch):
    calls = []

    def failing(self, raw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return b"png"

    monkeypatch.setattr(layout._GrayPngEncoder, "encode_rows", failing)
    with pytest.raises(RuntimeError):
        write_tree(str(tmp_path), "training", np.zeros((5, 2, 2), np.uint8), np.zeros(5, int), ["0"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "images, labels, names",
    [
        (np.zeros((2, 3, 3), np.float32), np.array([0, 0]), ["a"]),  # not uint8
        (np.zeros((2, 3), np.uint8), np.array([0, 0]), ["a"]),  # not 3-D
        (np.zeros((2, 3, 3), np.uint8), np.array([0]), ["a"]),  # count mismatch
        (np.zeros((2, 3, 3), np.uint8), np.array([0, 2]), ["a", "b"]),  # label without a name
        (np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), ["a", "a"]),  # duplicate names
        (np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), ["a", "../b"]),  # not a folder name
        (np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), ["a", ".hidden"]),  # skipped by list_pngs
    ],
)
def test_write_tree_refuses_bad_input(tmp_path, images, labels, names):
    with pytest.raises(DataError):
        write_tree(str(tmp_path), "training", images, labels, names)
    assert not (tmp_path / "training").exists()


def test_write_tree_with_ids_pads_names_to_sort(tmp_path):
    images = np.zeros((3, 2, 2), np.uint8)
    write_tree(str(tmp_path), "training", images, np.zeros(3, int), ["0"], ids=np.array([5, 123456, 70]))
    assert sorted(os.listdir(tmp_path / "training/0")) == ["000005.png", "000070.png", "123456.png"]


# --------------------------------------------------------------------------------------------
# IDX


def _idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_read_idx_raw_and_gzip_detected_by_magic(tmp_path):
    arr = np.random.default_rng(2).integers(0, 256, (4, 3, 5), dtype=np.uint8)
    (tmp_path / "raw.gz").write_bytes(_idx_bytes(arr))  # misleading name: not gzip
    (tmp_path / "packed.idx").write_bytes(gzip.compress(_idx_bytes(arr)))  # gzip without .gz
    for name in ("raw.gz", "packed.idx"):
        out = idx.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (4, 3, 5)
        np.testing.assert_array_equal(out, arr)
        out[0, 0, 0] = 1  # writable
    labels = np.arange(7, dtype=np.uint8)
    (tmp_path / "l").write_bytes(_idx_bytes(labels))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "l"), labels)


def test_read_idx_refuses_bad_files(tmp_path):
    arr = np.ones((3, 4, 4), np.uint8)
    good = _idx_bytes(arr)
    cases = {
        "short.idx": (good[:-1], "truncated"),
        "short.gz": (gzip.compress(good[:-5]), "truncated"),
        "cut.gz": (gzip.compress(good)[:-12], "corrupt or truncated gzip"),
        "header.idx": (good[:9], "truncated IDX header"),
        "long.idx": (good + b"\0", "trailing data"),
        "magic.idx": (b"\x12\x34" + good[2:], "not an IDX file"),
        "float.idx": (_idx_bytes(np.ones(3, np.float32), 0x0D), r"float32 \(0x0d\); only uint8"),
        "empty.idx": (b"", "not an IDX file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DataError, match=message) as e:
            idx.read_idx(tmp_path / name)
        assert name in str(e.value)
    with pytest.raises(DataError, match="cannot read"):
        idx.read_idx(tmp_path / "missing.gz")


def test_idx_to_tree(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (9, 6, 4), dtype=np.uint8)
    labels = np.array([2, 0, 1, 2, 2, 0, 1, 1, 0], np.uint8)
    (tmp_path / "i.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (tmp_path / "l.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    out = tmp_path / "out"
    assert idx.idx_to_tree(tmp_path / "i.gz", tmp_path / "l.gz", str(out), "training") == 9
    assert sorted(os.listdir(out / "training")) == ["0", "1", "2"]
    assert sorted(os.listdir(out / "training/2")) == ["00000.png", "00003.png", "00004.png"]
    np.testing.assert_array_equal(_png(out / "training/1/00007.png"), images[7])

    names = idx.FASHION_MNIST_CLASSES[:3]
    idx.idx_to_tree(tmp_path / "i.gz", tmp_path / "l.gz", str(out), "testing", class_names=names)
    assert sorted(os.listdir(out / "testing")) == sorted(names)
    with pytest.raises(DataError, match="are not in training/"):  # the splits' classes differ
        find_splits(str(out))

    with pytest.raises(DataError, match="label 2 but only 2 class names"):
        idx.idx_to_tree(tmp_path / "i.gz", tmp_path / "l.gz", str(out), "x", class_names=["a", "b"])
    (tmp_path / "l8.gz").write_bytes(gzip.compress(_idx_bytes(labels[:8])))
    with pytest.raises(DataError, match="9 images .* but 8 labels"):
        idx.idx_to_tree(tmp_path / "i.gz", tmp_path / "l8.gz", str(out), "x")
    with pytest.raises(DataError, match="expected images of shape"):
        idx.idx_to_tree(tmp_path / "l.gz", tmp_path / "l.gz", str(out), "x")
    assert not (out / "x").exists()


def test_fashion_mnist_class_names_are_folder_safe():
    assert len(set(idx.FASHION_MNIST_CLASSES)) == 10
    assert all(n.replace("_", "").isalnum() and n.islower() for n in idx.FASHION_MNIST_CLASSES)


# --------------------------------------------------------------------------------------------
# The bundled sample


@pytest.fixture(scope="module")
def sample_data():
    return sample.sample_arrays()


def test_sample_arrays(sample_data):
    images, labels = sample_data
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    assert 20 < images.mean() < 60 and images.max() == 255  # real digits, not blank


def test_split_sample_is_deterministic_disjoint_and_balanced(sample_data):
    _, labels = sample_data
    train, test = sample.split_sample(labels)
    assert len(train) == 4000 and len(test) == 1000
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(5000))
    np.testing.assert_array_equal(np.bincount(labels[train]), [400] * 10)
    np.testing.assert_array_equal(np.bincount(labels[test]), [100] * 10)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
    again = sample.split_sample(labels.copy())
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], test)
    # Pinned: the split must not change with a NumPy upgrade or a refactor (the first test indices
    # and a checksum of all of them, from the split that shipped).
    assert test[:5].tolist() == [2, 3, 9, 10, 11]
    assert int(test.sum()) == 2496374


@pytest.fixture(scope="module")
def sample_tree(tmp_path_factory):
    """The sample written once for the tests below (writing it takes most of a second)."""
    out = tmp_path_factory.mktemp("sample") / "s"
    return out, sample.write_sample(str(out))


def test_write_sample_tree_counts_and_values(sample_tree, sample_data):
    images, labels = sample_data
    out, splits = sample_tree
    assert splits == Splits(str(out / "training"), str(out / "testing"))
    assert find_splits(str(out)) == splits
    train_idx, test_idx = sample.split_sample(labels)
    for split, idxs, per_class in (("training", train_idx, 400), ("testing", test_idx, 100)):
        assert sorted(os.listdir(out / split)) == [str(d) for d in range(10)]
        for d in range(10):
            assert len(os.listdir(out / split / str(d))) == per_class
        for i in idxs[:: len(idxs) // 7]:  # a few, by value: file name = index in the bundled arrays
            np.testing.assert_array_equal(_png(out / split / str(labels[i]) / f"{i:05d}.png"), images[i])
    assert sorted(os.listdir(out.parent)) == ["s"]  # no temporary folder left
    assert _mode(out) == _umask_mode()
    with pytest.raises(DataError, match="exists already"):
        sample.write_sample(str(out))


def test_ensure_sample_writes_a_missing_sample(tmp_path, capsys, monkeypatch):
    written = []
    monkeypatch.setattr(sample, "write_sample", lambda out: written.append(out))  # the real one is tested above
    out = str(tmp_path / "data/mnist-sample")
    assert sample.ensure_sample(out) == out
    assert written == [out]
    err = capsys.readouterr().err
    assert out in err and err.count("\n") == 1


def test_ensure_sample_reuses_a_complete_sample(sample_tree, capsys):
    out = str(sample_tree[0])
    mtime = os.path.getmtime(os.path.join(out, "training/3"))
    assert sample.ensure_sample(out) == out  # present: nothing written, nothing said
    assert capsys.readouterr().err == ""
    assert os.path.getmtime(os.path.join(out, "training/3")) == mtime


def test_ensure_sample_refuses_an_incomplete_sample(tmp_path):
    out = tmp_path / "s"
    for d in range(10):
        (out / "training" / str(d)).mkdir(parents=True)
    with pytest.raises(DataError, match="not a complete sample.*remove"):
        sample.ensure_sample(str(out))


# --------------------------------------------------------------------------------------------
# find_splits


def _tree(root, files):
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(encode_png(np.zeros((2, 2), np.uint8)))


def test_find_splits_layouts(tmp_path):
    _tree(tmp_path / "split", ["training/a/1.png", "training/b/2.png", "testing/a/3.png", "README.md"])
    s = find_splits(str(tmp_path / "split"))
    assert s == Splits(str(tmp_path / "split/training"), str(tmp_path / "split/testing"))

    _tree(tmp_path / "trainonly", ["training/a/1.png", "training/b/2.png"])
    assert find_splits(str(tmp_path / "trainonly")) == Splits(str(tmp_path / "trainonly/training"), None)

    _tree(tmp_path / "flat", ["cat/1.png", "dog/x/2.PNG", ".cache/3.png"])
    assert find_splits(str(tmp_path / "flat")) == Splits(str(tmp_path / "flat"), None)


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "no such folder"),
        ([], "the data folder has no class subfolders"),
        (["loose.png"], "the data folder has no class subfolders"),
        (["training/x.png"], "training/ has no class subfolders"),
        (["testing/a/1.png"], "has testing/ but no training/"),
        (["a/readme.txt", "b/"], "no image files"),
        (["training/a/1.png", "testing/a/1.png", "testing/zebra/2.png"], r"\['zebra'\] are not in training/"),
        (["training/a/1.png", "testing/"], "testing/ has no class subfolders"),
    ],
)
def test_find_splits_bad_folders(tmp_path, files, message):
    data = tmp_path / "data"
    if files is not None:
        data.mkdir()
        for rel in files:
            if rel.endswith("/"):
                (data / rel).mkdir(parents=True)
            else:
                (data / rel).parent.mkdir(parents=True, exist_ok=True)
                (data / rel).write_bytes(b"x")
    with pytest.raises(DataError, match=message) as e:
        find_splits(str(data))
    msg = str(e.value)
    assert "\n" not in msg and "expected DATA/training/<class>/*.png" in msg or "not in training/" in msg


def test_find_splits_on_a_file(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(DataError, match="not a folder"):
        find_splits(str(tmp_path / "f"))


# --------------------------------------------------------------------------------------------
# Download against a local server


class _Server:
    """A local HTTP server for `files` (path -> bytes) that honors `Range: bytes=N-` unless told not to."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True, cut: int | None = None):
        self.files, self.ranges, self.cut = files, ranges, cut
        self.requests: list[tuple[str, str | None]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                owner.requests.append((self.path, rng))
                data = owner.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and owner.ranges:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if owner.cut is not None:  # announce everything, send `cut` bytes, hang up
                    self.wfile.write(data[start : start + owner.cut])
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _mnist_like_tgz(prefix: str = "mnist_png/") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split, n in (("training", 3), ("testing", 2)):
            for digit in ("0", "1"):
                for k in range(n):
                    img = np.full((28, 28), 10 * k + int(digit), np.uint8)
                    data = encode_png(img)
                    info = tarfile.TarInfo(f"{prefix}{split}/{digit}/{k}.png")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def tgz():
    return _mnist_like_tgz()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_verifies_and_reuses_the_cache(tmp_path, tgz):
    dest = str(tmp_path / "cache/a.tgz")
    with _Server({"/a.tgz": tgz}) as srv:
        assert mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz)) == dest
        assert open(dest, "rb").read() == tgz
        assert not os.path.exists(dest + ".part")
        assert srv.requests == [("/a.tgz", None)]
        mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz))
        assert len(srv.requests) == 1  # verified cached file: no network


def test_download_resumes_a_partial_file(tmp_path, tgz):
    dest = str(tmp_path / "a.tgz")
    cut = len(tgz) // 3
    with open(dest + ".part", "wb") as f:
        f.write(tgz[:cut])
    with _Server({"/a.tgz": tgz}) as srv:
        mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz))
        assert srv.requests == [("/a.tgz", f"bytes={cut}-")]
    assert open(dest, "rb").read() == tgz


def test_download_cut_short_keeps_the_part_and_resumes(tmp_path, tgz):
    dest = str(tmp_path / "a.tgz")
    with _Server({"/a.tgz": tgz}, cut=100) as srv:
        with pytest.raises(DownloadError, match="interrupted.*run the command again to resume") as e:
            mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz))
        assert "\n" not in str(e.value)
        assert open(dest + ".part", "rb").read() == tgz[:100]
        srv.cut = None
        mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz))
        assert srv.requests[-1] == ("/a.tgz", "bytes=100-")
    assert open(dest, "rb").read() == tgz
    assert os.listdir(tmp_path) == ["a.tgz"]


def test_download_restarts_when_the_server_ignores_ranges(tmp_path, tgz):
    dest = str(tmp_path / "a.tgz")
    with open(dest + ".part", "wb") as f:
        f.write(b"garbage" * 10)  # would fail the MD5 if it were kept
    with _Server({"/a.tgz": tgz}, ranges=False) as srv:
        mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5=_md5(tgz))
        assert srv.requests == [("/a.tgz", "bytes=70-")]
    assert open(dest, "rb").read() == tgz


def test_download_checksum_mismatch_removes_the_file(tmp_path, tgz):
    dest = str(tmp_path / "a.tgz")
    with _Server({"/a.tgz": tgz}) as srv:
        with pytest.raises(DownloadError, match="does not verify.*removed") as e:
            mnist.download(srv.url + "/a.tgz", dest, size=len(tgz), md5="0" * 32)
        assert "\n" not in str(e.value)
        with pytest.raises(DownloadError, match="bytes instead of"):
            mnist.download(srv.url + "/a.tgz", dest, size=len(tgz) + 1, md5=None)
    assert os.listdir(tmp_path) == []


def test_download_http_error(tmp_path):
    with _Server({}) as srv, pytest.raises(DownloadError, match="HTTP 404.*cnnkit data sample"):
        mnist.download(srv.url + "/nope.tgz", str(tmp_path / "x"), size=None, md5=None)
    assert os.listdir(tmp_path) == []


def test_download_unreachable_fails_fast_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    t = time.perf_counter()
    with pytest.raises(DownloadError) as e:
        mnist.download(f"http://127.0.0.1:{port}/mnist_png.tgz", str(tmp_path / "m.tgz"), size=10, md5=None)
    assert time.perf_counter() - t < 5
    msg = str(e.value)
    assert "\n" not in msg and "network is unreachable" in msg
    assert "`cnnkit data sample`" in msg and "`cnnkit data idx IMAGES LABELS --out DIR --split" in msg
    assert e.value.exit_code == 2


def test_fetch_mnist_end_to_end(tmp_path, tgz, monkeypatch):
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    out = str(tmp_path / "data/mnist_png")
    with _Server({"/mnist_png.tgz": tgz}) as srv:
        splits = mnist.fetch_mnist(out, url=srv.url + "/mnist_png.tgz", md5=_md5(tgz), size=len(tgz))
        assert splits == Splits(os.path.join(out, "training"), os.path.join(out, "testing"))
        assert sorted(os.listdir(os.path.join(out, "training/1"))) == ["0.png", "1.png", "2.png"]
        assert sorted(os.listdir(os.path.join(out, "testing/0"))) == ["0.png", "1.png"]
        assert _png(os.path.join(out, "training/1/2.png"))[0, 0] == 21
        assert os.path.isfile(tmp_path / "cache/mnist_png.tgz")
        assert sorted(os.listdir(tmp_path / "data")) == ["mnist_png"]  # no temporary folders left
        assert mnist.fetch_mnist(out, url=srv.url + "/mnist_png.tgz") == splits  # present: no network
        assert len(srv.requests) == 1


def test_fetch_mnist_refuses_other_layouts(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("other/file.txt")
        tar.addfile(info, io.BytesIO(b""))
    with _Server({"/o.tgz": buf.getvalue()}) as srv, pytest.raises(DataError, match="expected mnist_png/training/"):
        mnist.fetch_mnist(
            str(tmp_path / "o"), url=srv.url + "/o.tgz", cache_dir=str(tmp_path / "c"), md5=None, size=None
        )
    assert sorted(os.listdir(tmp_path)) == ["c"]


# --------------------------------------------------------------------------------------------
# Safe extraction


def _evil_tgz(path, evil: tarfile.TarInfo, data: bytes = b"evil") -> str:
    with tarfile.open(path, "w:gz") as tar:
        ok = tarfile.TarInfo("mnist_png/training/0/a.png")
        ok.size = 2
        tar.addfile(ok, io.BytesIO(b"ok"))
        if evil.isreg():
            evil.size = len(data)
            tar.addfile(evil, io.BytesIO(data))
        else:
            tar.addfile(evil)
    return str(path)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: _member("../evil.png"), "outside the folder"),
        (lambda t: _member("mnist_png/../../evil.png"), "outside the folder"),
        (lambda t: _member(str(t / "abs/evil.png")), "absolute path"),
        (lambda t: _member("mnist_png/link", tarfile.SYMTYPE, str(t / "abs")), "link"),
        (lambda t: _member("mnist_png/hard", tarfile.LNKTYPE, "mnist_png/training/0/a.png"), "link"),
        (lambda t: _member("mnist_png/dev", tarfile.CHRTYPE), "device or fifo"),
        (lambda t: _member("mnist_png/fifo", tarfile.FIFOTYPE), "device or fifo"),
    ],
)
def test_safe_extract_refuses_unsafe_members(tmp_path, make, message):
    archive = _evil_tgz(tmp_path / "evil.tgz", make(tmp_path))
    dest = tmp_path / "work/dest"
    with pytest.raises(DataError, match=message):
        mnist.safe_extract(archive, str(dest))
    assert not os.path.lexists(dest)
    assert os.listdir(tmp_path / "work") == []  # the temporary folder is gone too
    assert sorted(os.listdir(tmp_path)) == ["evil.tgz", "work"]  # nothing written outside
    assert not os.path.lexists(tmp_path / "abs")


def test_safe_extract_refuses_symlink_then_write_through_it(tmp_path):
    # The classic two-step escape: a symlink member, then a file "inside" it.
    archive = tmp_path / "two.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(_member("d", tarfile.SYMTYPE, str(tmp_path / "outside")))
        f = _member("d/evil.png")
        f.size = 1
        tar.addfile(f, io.BytesIO(b"x"))
    (tmp_path / "outside").mkdir()
    with pytest.raises(DataError, match="link"):
        mnist.safe_extract(str(archive), str(tmp_path / "dest"))
    assert os.listdir(tmp_path / "outside") == []
    assert not os.path.lexists(tmp_path / "dest")


def test_safe_extract_ok_and_refuses_garbage(tmp_path, tgz):
    (tmp_path / "a.tgz").write_bytes(tgz)
    dest = str(tmp_path / "x")
    assert mnist.safe_extract(str(tmp_path / "a.tgz"), dest) == dest
    assert sorted(os.listdir(os.path.join(dest, "mnist_png"))) == ["testing", "training"]
    assert _mode(dest) == _umask_mode()
    with pytest.raises(DataError, match="exists already"):
        mnist.safe_extract(str(tmp_path / "a.tgz"), dest)
    (tmp_path / "bad.tgz").write_bytes(tgz[: len(tgz) // 2])
    with pytest.raises(DataError, match="not a readable tar archive"):
        mnist.safe_extract(str(tmp_path / "bad.tgz"), str(tmp_path / "y"))
    assert not os.path.lexists(tmp_path / "y")
