"""cnnkit.images against bad and unusual input: the conversion policy for every PNG form, the integrity
checks (truncation, CRC), decompression bombs, the folder walk's odd entries, and property-based tests
(hypothesis) for the decoder."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pngfiles import DEPTHS, chunk, chunks, encode, expected_gray, fix_crcs, pillow_png, random_png

from cnnkit import images
from cnnkit.images import MAX_PIXELS, ImageError
from cnnkit.listing import describe_ignored, list_pngs

SIZE = (28, 28)


def decode_image(data: bytes, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """`images.decode_image` for a grayscale model of `size`: (uint8 (H, W), converted)."""
    img, converted = images.decode_image(data, (1, *size))
    assert img.shape == (1, *size)
    return img[0], converted


def read_image(path: str, size: tuple[int, int]) -> tuple[np.ndarray, bool]:
    img, converted = images.read_image(path, (1, *size))
    return img[0], converted


FORMS = [(color, depth) for color, depths in DEPTHS.items() for depth in depths]


# --------------------------------------------------------------------------------------------
# Conversion policy: every color type x bit depth x interlacing, against the policy written out


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("color, depth", FORMS, ids=[f"type{c}-{d}bit" for c, d in FORMS])
def test_every_png_form_decodes_by_the_policy(color, depth, interlace):
    rng = np.random.default_rng(color * 100 + depth)
    data, want = random_png(rng, *SIZE, color, depth, interlace)
    img, converted = decode_image(data, SIZE)
    assert img.dtype == np.uint8 and img.shape == SIZE and img.flags.c_contiguous
    np.testing.assert_array_equal(img, want)
    assert converted == (color != 0 or depth != 8)
    # Another size: the same pixels, resized.
    data, want = random_png(rng, 9, 41, color, depth, interlace)
    img, converted = decode_image(data, SIZE)
    assert converted and img.shape == SIZE and img.dtype == np.uint8
    np.testing.assert_array_equal(img, images._resize(want, *SIZE))


def test_palette_transparency_and_gray_alpha_drop_alpha():
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 16, (*SIZE, 1))
    palette = rng.integers(0, 256, (16, 3))
    with_trns = encode(idx, 4, 3, palette=palette, trns=bytes(range(0, 256, 16)))
    np.testing.assert_array_equal(decode_image(with_trns, SIZE)[0], expected_gray(idx, 4, 3, palette))
    gray = rng.integers(0, 256, (*SIZE, 1))
    ga = np.concatenate([gray, np.zeros_like(gray)], axis=2)  # fully transparent: the gray values count
    np.testing.assert_array_equal(decode_image(encode(ga, 8, 4), SIZE)[0], gray[:, :, 0].astype(np.uint8))


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "P+tRNS", "RGB", "RGBA", "I;16"])
def test_files_made_by_pillow(mode):
    """Pillow's own PNGs of each mode: right shape and dtype, and the pixels Pillow itself sees."""
    import io

    from PIL import Image

    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
    if mode == "I;16":
        data = pillow_png(rng.integers(0, 65536, SIZE).astype(np.uint16))
        assert data[24:26] == b"\x10\x00"  # 16-bit gray
    elif mode == "P+tRNS":
        data = pillow_png(rgb, "P", transparency=0)
    else:
        data = pillow_png(rgb, mode)
    img, converted = decode_image(data, SIZE)
    assert img.shape == SIZE and img.dtype == np.uint8 and converted == (mode != "L")
    ref = Image.open(io.BytesIO(data))
    if ref.mode.startswith("I"):
        want = (np.asarray(ref, dtype=np.int64) >> 8).astype(np.uint8)
    else:
        want = np.asarray(ref.convert("RGB"), dtype=np.int64)
        want = ((want[:, :, 0] * 299 + want[:, :, 1] * 587 + want[:, :, 2] * 114 + 500) // 1000).astype(np.uint8)
    np.testing.assert_array_equal(img, want)
    if mode == "1":
        assert set(np.unique(img)) <= {0, 255}  # 1-bit scaled, not 0/1


# --------------------------------------------------------------------------------------------
# Integrity: never a silent wrong answer


def _gray_png(seed: int = 3) -> tuple[bytes, np.ndarray]:
    from cnnkit.datasets.layout import encode_png

    img = np.random.default_rng(seed).integers(0, 256, SIZE, dtype=np.uint8)  # incompressible: stored blocks
    return encode_png(img), img


def test_every_truncation_is_refused():
    data, _ = _gray_png()
    for n in range(len(data)):
        with pytest.raises(ImageError) as err:
            decode_image(data[:n], SIZE)
        why = str(err.value)
        assert ("empty" in why) if n == 0 else ("truncated" in why), (n, why)


def test_every_flipped_bit_is_refused_or_harmless():
    """libspng (as pyspng runs it) checks no CRC: a flipped bit in a stored block used to decode to a
    wrong image. Every flip of every byte after the signature is now refused."""
    data, img = _gray_png()
    for i in range(8, len(data)):
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            try:
                out, _ = decode_image(bytes(bad), SIZE)
            except ImageError:
                continue
            np.testing.assert_array_equal(out, img, err_msg=f"byte {i} bit {bit:#x}: silent wrong answer")


@pytest.mark.parametrize("kind", [b"IHDR", b"IDAT", b"IEND", b"tEXt"])
def test_bad_crc_names_the_chunk(kind):
    data = encode(np.zeros((4, 4), int), 8, 0, extra=((b"tEXt", b"Comment\x00hello"),))
    pos, _, length = next(c for c in chunks(data) if c[1] == kind)
    bad = bytearray(data)
    bad[pos + 8 + length] ^= 0xFF  # the CRC's first byte
    with pytest.raises(ImageError, match=f"bad CRC in {kind.decode()} chunk"):
        decode_image(bytes(bad), SIZE)


def test_short_idat_stream_is_refused_not_zero_filled():
    raw = b"".join(b"\x00" + bytes(28) for _ in range(14))  # 14 of 28 rows, CRCs all valid
    data = encode(np.zeros((28, 28), int), 8, 0)
    ihdr_end = 33
    short = data[:ihdr_end] + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    with pytest.raises(ImageError, match="IDAT stream too short"):
        decode_image(short, SIZE)


def test_bytes_after_iend_are_ignored_and_chunks_may_split():
    data, img = _gray_png()
    assert np.array_equal(decode_image(data + b"trailing garbage", SIZE)[0], img)
    # The same image with its IDAT split in three chunks and an ancillary chunk between them.
    (pos, _, length) = next(c for c in chunks(data) if c[1] == b"IDAT")
    z = data[pos + 8 : pos + 8 + length]
    parts = [z[:100], z[100:300], z[300:]]
    split = data[:33] + chunk(b"IDAT", parts[0]) + chunk(b"IDAT", parts[1]) + chunk(b"IDAT", parts[2])
    split += chunk(b"IEND", b"")
    assert np.array_equal(decode_image(split, SIZE)[0], img)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, this is text\n", "not an image (bad signature, looks like text)"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "truncated JPEG"),  # told by its bytes, decoded as JPEG
        (b"GIF89a\x01\x00", "corrupt GIF"),
        (b"%PDF-1.4", "not an image (bad signature, looks like PDF)"),
        (b"\x89PNG\r\n", "truncated PNG"),
        (b"\x89PNG\r\n\x1a\n", "truncated PNG (no IHDR chunk)"),
        (encode(np.zeros((2, 2), int), 8, 0)[:40], "truncated PNG"),
        (encode(np.zeros((2, 2), int), 8, 0)[:-12], "truncated PNG (no IEND chunk)"),
        (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0)), "invalid PNG size 0x5"),
        (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 5, 3, 2, 0, 0, 0)), "invalid color type 2"),
    ],
)
def test_failure_reasons_are_one_line(data, reason):
    with pytest.raises(ImageError) as err:
        decode_image(data, SIZE)
    assert reason in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# Decompression bombs and large files


def _bomb(width: int, height: int, color: int = 6, depth: int = 16) -> bytes:
    """A tiny file whose header declares width x height (its IDAT: 1 kB of zeros, CRCs valid)."""
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes(1000), 9)) + chunk(b"IEND", b"")


def test_bomb_is_refused_before_any_allocation(tmp_path):
    """Decoded in a fresh interpreter allowed 1 GB of address space above what it holds at the start:
    a real bomb (a 65 kB file that inflates to 8192 x 8192 pixels), headers declaring 10^10 pixels of
    RGBA16 (80 GB) and (2^31 - 1)^2 pixels, and one pixel over the limit are all refused by the header
    check, and the process's high-water mark does not move (without the check the real bomb alone
    adds 64 MB)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("uses /proc and RLIMIT_AS")
    side = 8192
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    real = b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(bytes((side + 1) * side), 9))
    (tmp_path / "real.png").write_bytes(real + chunk(b"IEND", b""))
    for w, h in ((100_000, 100_000), (2**31 - 1, 2**31 - 1), (4097, 4096)):
        (tmp_path / f"{w}x{h}.png").write_bytes(_bomb(w, h))
    code = f"""
import os, resource
from cnnkit.images import ImageError, read_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pages = int(open("/proc/self/statm").read().split()[0])
resource.setrlimit(resource.RLIMIT_AS, (pages * 4096 + (1 << 30), resource.RLIM_INFINITY))
for name in sorted(os.listdir({str(tmp_path)!r})):
    try:
        read_image(os.path.join({str(tmp_path)!r}, name), (1, 28, 28))
        print("DECODED", name)
    except ImageError as e:
        print("refused:", e)
print("grown_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("refused: too large: ") == 4 and "DECODED" not in proc.stdout, proc.stdout
    assert "100000x100000 pixels (limit 16,777,216)" in proc.stdout and "8192x8192" in proc.stdout
    assert int(proc.stdout.split("grown_kb")[1]) < 10_000, proc.stdout


def test_the_largest_allowed_image_decodes():
    side = int(MAX_PIXELS**0.5)  # 4096 x 4096 8-bit gray of zeros: a 16 kB file
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    idat = chunk(b"IDAT", zlib.compress(bytes((side + 1) * side), 9))
    img, converted = decode_image(b"\x89PNG\r\n\x1a\n" + ihdr + idat + chunk(b"IEND", b""), SIZE)
    assert converted and img.shape == SIZE and not img.any()


def test_file_over_the_byte_limit_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100_000)
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(10 << 30)  # a sparse 10 GB file: reading it would take a while
    with pytest.raises(ImageError, match="too large: file over"):
        read_image(str(path), SIZE)


def test_unreadable_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(_gray_png()[0])
    real_open = os.open

    def denied(path, *a, **k):  # what a chmod 000 file gives (the tests may run as root)
        if str(path).endswith("x.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(ImageError, match="^unreadable: Permission denied$"):
        read_image(str(tmp_path / "x.png"), SIZE)


def test_fifo_named_like_a_png_does_not_block(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageError, match="empty file"):  # read directly: O_NONBLOCK, no writer
        read_image(str(tmp_path / "pipe.png"), SIZE)


# --------------------------------------------------------------------------------------------
# The walk


def test_walk_lists_counts_or_reports_every_odd_entry(tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    good, _ = _gray_png()
    (root / "a" / "x.png").write_bytes(good)
    (root / "a" / "UPPER.PNG").write_bytes(good)
    (root / "a" / "notes.txt").write_text("hi")
    (root / "a" / ".hidden.png").write_bytes(good)
    (root / ".cache").mkdir()
    (root / ".cache" / "y.png").write_bytes(good)
    (root / "folder.png").mkdir()
    (root / "folder.png" / "inside.png").write_bytes(good)
    os.symlink("a/x.png", root / "link.png")  # followed
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("loop.png", root / "loop.png")
    os.symlink("a", root / "linked_dir")  # not entered
    os.symlink("a", root / "linked_dir.png")  # not entered either
    os.symlink("nowhere", root / "dangling.txt")
    os.mkfifo(root / "fifo.png")
    bad = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not valid UTF-8
    with open(os.path.join(os.fsencode(root), b"caf\xe9.png"), "wb") as f:
        f.write(good)
    listing = list_pngs(str(root))
    assert listing.files == sorted(["a/UPPER.PNG", "a/x.png", bad, "folder.png/inside.png", "link.png"])
    assert dict(listing.skipped) == {
        "dangling.png": "dangling symlink",
        "loop.png": "symlink loop",
        "fifo.png": "not a regular file (a FIFO)",
    }
    assert listing.ignored == {"other_files": 2, "hidden": 2, "symlinked_folders": 2}
    assert listing.png_folders == ["folder.png"]
    assert describe_ignored(listing.ignored) == (
        "2 non-image files, 2 hidden entries, 2 symlinked folders (not entered)"
    )
    img, _ = read_image(os.path.join(str(root), bad), SIZE)  # the surrogate-escaped name opens
    assert img.shape == SIZE


def test_unreadable_folder_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    (tmp_path / "locked").mkdir()
    (tmp_path / "ok.png").write_bytes(_gray_png()[0])
    os.chmod(tmp_path / "locked", 0)
    try:
        listing = list_pngs(str(tmp_path))
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert listing.files == ["ok.png"] and listing.skipped[0][0] == "locked"
    assert "unreadable folder" in listing.skipped[0][1]


# --------------------------------------------------------------------------------------------
# Property-based tests


PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_image_error(data):
    try:
        img, _ = decode_image(data, SIZE)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert img.shape == SIZE and img.dtype == np.uint8


@PROPERTY
@given(st.data())
def test_corrupted_pngs_with_valid_crcs_reach_libspng_and_only_raise_image_error(data):
    """Random byte changes to a valid PNG with every CRC recomputed: the damage gets past the CRC
    check into libspng (header fields, zlib stream, filters), which must fail cleanly or decode."""
    color, depth = data.draw(st.sampled_from(FORMS))
    h, w = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    png, _ = random_png(
        np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), h, w, color, depth, data.draw(st.booleans())
    )
    bad = bytearray(png)
    for _ in range(data.draw(st.integers(1, 4))):
        bad[data.draw(st.integers(8, len(bad) - 1))] = data.draw(st.integers(0, 255))
    try:
        img, _ = decode_image(fix_crcs(bytes(bad)), SIZE)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert img.shape == SIZE and img.dtype == np.uint8


@PROPERTY
@given(
    form=st.sampled_from(FORMS),
    h=st.integers(1, 70),
    w=st.integers(1, 70),
    interlace=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([(28, 28), (16, 32), (1, 1)]),
)
def test_any_valid_png_decodes_to_the_model_input(form, h, w, interlace, seed, size):
    color, depth = form
    png, want = random_png(np.random.default_rng(seed), h, w, color, depth, interlace)
    img, converted = decode_image(png, size)
    assert img.shape == size and img.dtype == np.uint8
    assert converted == (color != 0 or depth != 8 or (h, w) != size)
    if (h, w) == size:
        np.testing.assert_array_equal(img, want)


@PROPERTY
@given(
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
    h=st.integers(1, 60),
    w=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_pillow_png_decodes_to_the_model_input(mode, h, w, seed):
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        data = pillow_png(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    else:
        data = pillow_png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode)
    img, _ = decode_image(data, SIZE)
    assert img.shape == SIZE and img.dtype == np.uint8
