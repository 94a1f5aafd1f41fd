"""cnnkit.formats: formats told by their bytes, decoded to the right pixels, oriented, refused with one-line
reasons when truncated, corrupt or too large; and the listing that finds them. Fixtures are written here
by Pillow and numpy."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from cnnkit import formats
from cnnkit.errors import ImageError
from cnnkit.formats import MAX_PIXELS, decode_other, orientation, probe, sniff
from cnnkit.listing import IMAGE_SUFFIXES, is_image_name, list_images, list_pngs

RNG = np.random.default_rng(17)
RGB = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
GRAY = RNG.integers(0, 256, (24, 40), dtype=np.uint8)
# A smooth picture: JPEG keeps it within a few levels, where noise would not survive.
SMOOTH = np.dstack([*np.meshgrid(np.arange(40) * 6, np.arange(24) * 10), np.full((24, 40), 128)]).astype(np.uint8)


def encode(arr_or_image, fmt: str, **kw) -> bytes:
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


LOSSLESS = [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})]


@pytest.mark.parametrize(("fmt", "kw"), LOSSLESS, ids=lambda v: str(v))
@pytest.mark.parametrize("arr", [RGB, GRAY], ids=["rgb", "gray"])
def test_lossless_formats_decode_exactly(fmt, kw, arr):
    data = encode(arr, fmt, **kw)
    out = decode_other(data)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    if fmt == "WEBP" and arr.ndim == 2:  # WebP has no gray mode: Pillow stores it as RGB
        assert np.array_equal(out, np.dstack([arr] * 3))
    else:
        assert np.array_equal(out, arr)
    assert probe(data) == (*out.shape[:2], 1 if out.ndim == 2 else 3)


@pytest.mark.parametrize("arr", [SMOOTH, SMOOTH[:, :, 0]], ids=["rgb", "gray"])
def test_jpeg_decodes_within_a_small_tolerance(arr):
    data = encode(arr, "JPEG", quality=95)
    assert sniff(data) == "jpeg"
    out = decode_other(data)
    assert out.shape == arr.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - arr).mean() < 3
    assert probe(data) == (24, 40, arr.ndim if arr.ndim == 3 else 1)


def test_lossy_webp_decodes_close():
    out = decode_other(encode(SMOOTH, "WEBP", quality=95))
    assert out.shape == SMOOTH.shape and np.abs(out.astype(int) - SMOOTH).mean() < 4


def test_gif_first_frame_only_and_palette_becomes_rgb():
    frames = [Image.fromarray(np.full((8, 10, 3), c, np.uint8)) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = decode_other(data)
    assert out.shape == (8, 10, 3) and (out == (255, 0, 0)).all()
    assert probe(data) == (8, 10, 3)


def test_multipage_tiff_first_page():
    pages = [Image.fromarray(np.full((6, 7), v, np.uint8)) for v in (10, 200)]
    assert (decode_other(encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])) == 10).all()


def test_16_bit_tiff_keeps_the_high_byte():
    arr = RNG.integers(0, 65536, (9, 11), dtype=np.uint16)
    data = encode(Image.fromarray(arr), "TIFF")
    assert np.array_equal(decode_other(data), (arr >> 8).astype(np.uint8))
    assert probe(data) == (9, 11, 1)


@pytest.mark.parametrize(
    ("mode", "expect"),
    [("RGBA", RGB), ("LA", GRAY), ("P", None), ("1", None)],
)
def test_alpha_palette_and_bilevel_sources(mode, expect):
    src = Image.fromarray(RGB if mode in ("RGBA", "P") else GRAY)
    im = src.convert(mode) if mode != "LA" else Image.merge("LA", (src, src.point(lambda v: 255 - v)))
    if mode == "RGBA":
        im.putalpha(Image.fromarray(GRAY))
    out = decode_other(encode(im, "TIFF"))
    want = expect if expect is not None else np.asarray(im.convert("RGB" if mode == "P" else "L"))
    assert np.array_equal(out, want)  # alpha dropped, colour values kept; palette looked up; 1-bit 0/255


def test_cmyk_jpeg_becomes_rgb():
    """Pillow writes CMYK JPEGs as Photoshop does: inverted values, said so in an APP14 "Adobe" segment."""
    data = encode(Image.fromarray(SMOOTH).convert("CMYK"), "JPEG", quality=95)
    assert b"\xff\xee\x00\x0eAdobe" in data
    out = decode_other(data)
    assert out.shape == SMOOTH.shape and np.abs(out.astype(int) - SMOOTH).mean() < 4
    assert probe(data) == (24, 40, 3)


# EXIF orientation: each tag's array must match Pillow's own reading of the tag (ImageOps.exif_transpose).
ASYM = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3) * 3


@pytest.mark.parametrize("orient", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "TIFF-lzw", "WEBP"])
def test_exif_orientation_is_applied(fmt, orient):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orient
    src = Image.fromarray(np.kron(ASYM, np.ones((8, 8, 1), np.uint8)))  # 32 x 48 blocks survive JPEG
    kw = {
        "JPEG": {"quality": 98, "subsampling": 0},
        "WEBP": {"lossless": True},
        "TIFF-lzw": {"compression": "tiff_lzw"},
    }
    data = encode(src, fmt[:4], exif=exif.tobytes(), **kw.get(fmt, {}))
    with Image.open(io.BytesIO(data)) as im:
        want = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)
    out = decode_other(data)
    assert orientation(data) == orient
    assert out.shape == want.shape and out.flags.c_contiguous
    assert np.abs(out.astype(int) - want).max() <= (12 if fmt == "JPEG" else 0)
    assert probe(data) == (*out.shape[:2], 3)


def test_orientation_of_a_jpeg_without_exif_is_1():
    assert orientation(encode(RGB, "JPEG")) == 1 and orientation(encode(RGB, "BMP")) == 1


# Refusals: one line, an ImageError, never a silently filled image.
@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (encode(SMOOTH, "JPEG")[:-2], "^truncated JPEG$"),  # no EOI marker
        (encode(SMOOTH, "JPEG")[:-200], "^truncated JPEG$"),
        (encode(SMOOTH, "JPEG", progressive=True)[:-200], "^truncated JPEG$"),
        (encode(SMOOTH, "JPEG")[:100], "^truncated JPEG"),
        (encode(RGB, "WEBP", lossless=True)[:-50], "^truncated WebP$"),
        (encode(RGB, "WEBP")[:-10], "^truncated WebP$"),
        (encode(RGB, "GIF")[:-200], "^truncated GIF$"),
        (encode(RGB, "BMP")[:-10], "^truncated BMP$"),
        (encode(RGB, "TIFF")[:-100], "^truncated TIFF$"),
        (b"", "^empty file$"),
        (b"%PDF-1.7\n...", r"^not an image \(bad signature, looks like PDF\)$"),
        (b"hello, world", r"^not an image \(bad signature, looks like text\)$"),
        (b"BMW owners manual, 2nd edition", r"^not an image \(bad signature, looks like text\)$"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_truncated_corrupt_and_unknown_bytes_are_refused(data, reason):
    with pytest.raises(ImageError, match=reason) as err:
        decode_other(data)
    assert "\n" not in str(err.value)


def test_corrupt_jpeg_data_is_refused_not_smeared():
    data = bytearray(encode(SMOOTH, "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 30 : sos + 32] = b"\xff\xd3"  # a restart marker where the entropy-coded data was
    with pytest.raises(ImageError, match="^corrupt JPEG: premature end of data segment$"):
        decode_other(bytes(data))


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + info


def _gif_header(width: int, height: int) -> bytes:
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00\x3b"
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6 + image


@pytest.mark.parametrize("header", [_bmp_header, _gif_header], ids=["bmp", "gif"])
@pytest.mark.parametrize("side", [20000, 5000])  # over Pillow's own bomb limits, and only over ours
def test_bomb_headers_are_refused_before_decoding(header, side, recwarn):
    data = header(side, side)
    assert len(data) < 100
    for fn in (decode_other, probe):
        with pytest.raises(ImageError, match=r"^too large: (5000x5000|over [\d,]+) pixels \(limit 16,777,216\)$"):
            fn(data)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_bomb_jpeg_header_is_refused_before_decoding(monkeypatch):
    data = encode(SMOOTH, "JPEG")
    monkeypatch.setattr(formats, "MAX_PIXELS", 24 * 40 - 1)
    with pytest.raises(ImageError, match=r"^too large: 40x24 pixels \(limit 959\)$"):
        decode_other(data)
    assert MAX_PIXELS == 1 << 24


def test_png_bytes_are_not_decode_others_business_but_probe_reads_them():
    data = encode(RGB, "PNG")
    assert sniff(data) == "png" and probe(data) == (24, 40, 3)
    with pytest.raises(ValueError, match="decode_image"):
        decode_other(data)


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp"), ("BMP", "bmp"), ("TIFF", "tiff"), ("GIF", "gif")],
)
def test_sniff_reads_the_magic_bytes(fmt, kind):
    assert sniff(encode(RGB, fmt)) == kind


# Listing: every image suffix, any case; decoding goes by content.
def test_listing_picks_up_every_image_suffix(tmp_path):
    (tmp_path / "c").mkdir()
    names = [f"a{i}{suffix.upper() if i % 2 else suffix}" for i, suffix in enumerate(IMAGE_SUFFIXES)]
    for name in [*names, "notes.txt", "x.jpgx", "raw.heic"]:
        (tmp_path / "c" / name).write_bytes(b"")
    listing = list_images(str(tmp_path))
    assert listing.files == sorted(f"c/{n}" for n in names)
    assert listing.ignored["other_files"] == 3
    assert list_pngs is list_images and is_image_name("PHOTO.JPEG") and not is_image_name("jpeg")


def test_mislabelled_extension_decodes_by_content(tmp_path):
    (tmp_path / "photo.png").write_bytes(encode(SMOOTH, "JPEG", quality=95))
    data = (tmp_path / list_images(str(tmp_path)).files[0]).read_bytes()
    assert sniff(data) == "jpeg"
    assert np.abs(decode_other(data).astype(int) - SMOOTH).mean() < 3
