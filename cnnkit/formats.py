"""Image formats other than PNG, told apart by their bytes. Torch-free: shared by training and inference.

`cnnkit.images` decodes PNG itself (with its own integrity checks) and hands every other image here:
`sniff` names the format from the magic bytes (never from the file name: a `.png` holding JPEG bytes
is a JPEG), `probe` reads (height, width, channels) from the header alone, and `decode_other` returns
the pixels as uint8, (H, W) for grayscale sources and (H, W, 3) RGB for colour ones.

Decoders: JPEG goes through simplejpeg (libjpeg-turbo, bundled in its wheel; the fastest of the
decoders measured in docs/results/jpeg-decoders.json), with Pillow as the fallback for what it refuses
(CMYK, 12-bit, odd files); WebP, BMP, TIFF and GIF go through Pillow.

Conversion policy, the same as the PNG path's where the two meet:
  - EXIF orientation (tags 2..8) is applied, so the array is the picture as a phone shows it;
  - palette, alpha and CMYK images become RGB (alpha dropped, colour values kept), gray + alpha gray;
  - 16-bit samples are reduced to their high byte (v >> 8); 1-bit gray becomes 0/255;
  - GIF: the first frame only; multi-page TIFF: the first page.

Integrity policy ("never a silent wrong answer"): every refusal is an `ImageError` with a one-line
reason. A header that declares more than `MAX_PIXELS` pixels is refused before any pixel is
allocated ("too large"), and Pillow's own decompression-bomb warning or error becomes that refusal
too; a truncated file is refused ("truncated JPEG"), never zero-filled (Pillow's
`ImageFile.LOAD_TRUNCATED_IMAGES` is left False; simplejpeg runs in strict mode); bytes that are no
image get the reason `cnnkit.images` gives ("not an image (bad signature, looks like PDF)").
"""

from __future__ import annotations

import contextlib
import struct
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

from cnnkit.errors import ImageError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# 16.7M pixels (4096 x 4096): far above any input of a small CNN. The largest decoded buffer is then
# 50 MB (8-bit RGB) per decoder process; a bomb's header is refused before any of it is allocated.
MAX_PIXELS = 1 << 24

_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
_PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF"}
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)  # the DIB header sizes Windows and OS/2 define
# What a file that is no image usually is, for the failure reason.
_OTHER_MAGIC = ((b"%PDF", "PDF"), (b"PK\x03\x04", "zip"), (b"\x1f\x8b", "gzip"), (b"RIFF", "RIFF"))


def sniff(data: bytes) -> str | None:
    """The image format of `data` from its magic bytes: "png", "jpeg", "webp", "bmp", "tiff", "gif", or None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    # "BM" alone is too common a start of text: the DIB header size must be one BMP defines.
    if data[:2] == b"BM" and (len(data) < 18 or struct.unpack_from("<I", data, 14)[0] in _BMP_HEADER_SIZES):
        return "bmp"
    return None


def _not_image(data: bytes) -> ImageError:
    if len(data) == 0:
        return ImageError("empty file")
    kind = next((name for magic, name in _OTHER_MAGIC if data.startswith(magic)), None)
    if kind is None and data[:64].isascii():
        kind = "text"
    return ImageError(f"not an image (bad signature{', looks like ' + kind if kind else ''})")


def _format_of(data: bytes) -> str:
    kind = sniff(data)
    if kind is None:
        raise _not_image(data)
    return kind


def _check_size(height: int, width: int) -> None:
    if height == 0 or width == 0:
        raise ImageError(f"invalid image size {width}x{height}")
    if height * width > MAX_PIXELS:
        raise ImageError(f"too large: {width}x{height} pixels (limit {MAX_PIXELS:,})")


# JPEG: the segments before the first scan hold the size (SOF) and the orientation (APP1 Exif).
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM and RSTn carry no length
_U16 = struct.Struct(">H")
_SOF = struct.Struct(">BHHB")  # precision, height, width, components


def _jpeg_header(data: bytes) -> tuple[int, int, int, int, int]:
    """(height, width, components, precision, orientation) from the segments before the frame header.

    A walk over the segment lengths only (a phone photo's 64 kB of Exif is skipped, not read), so it
    costs a few microseconds and allocates nothing the size of the image.
    """
    pos, n, orientation = 2, len(data), 1
    while True:
        if pos + 4 > n:
            raise ImageError("truncated JPEG (ends inside its header)")
        if data[pos] != 0xFF:
            raise ImageError("corrupt JPEG: no marker where one is due")
        marker = data[pos + 1]
        if marker == 0xFF or marker in _STANDALONE:  # fill byte / no-length marker
            pos += 1 if marker == 0xFF else 2
            continue
        end = pos + 2 + _U16.unpack_from(data, pos + 2)[0]
        if end > n:
            raise ImageError("truncated JPEG (ends inside its header)")
        if marker in _SOF_MARKERS:
            if end - pos < 10:
                raise ImageError("corrupt JPEG: short frame header")
            precision, height, width, components = _SOF.unpack_from(data, pos + 4)
            return height, width, components, precision, orientation
        if marker in (0xDA, 0xD9):
            raise ImageError("corrupt JPEG: no frame header before the image data")
        if marker == 0xE1 and data.startswith(b"Exif\x00\x00", pos + 4) and orientation == 1:
            orientation = _exif_orientation(data[pos + 10 : end])
        pos = end


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 in a TIFF-structured Exif block; 1 when absent or unreadable."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(tiff[:4])
    if order is None:
        return 1
    try:
        ifd = struct.unpack_from(order + "I", tiff, 4)[0]
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, _, value = struct.unpack_from(order + "HHIH", tiff, entry)
            if tag == 0x0112:
                return value if kind == 3 and 1 <= value <= 8 else 1
    except struct.error:  # an entry past the end of the block
        pass
    return 1


def orientation(data: bytes) -> int:
    """The EXIF orientation (1..8; 1 = as stored) of an image's bytes; 1 where it has none.

    Raises:
        ImageError: the bytes are not an image, or its header cannot be read.
    """
    kind = _format_of(data)
    return _jpeg_header(data)[4] if kind == "jpeg" else _pillow_header(kind, data)[3]


def _swaps_axes(orient: int) -> bool:
    return orient >= 5  # transpose, rotate 90, transverse, rotate 270


def probe(data: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of the picture in `data`, from its header only (no pixel is decoded).

    The shape `decode_other` returns (channels 1: an (H, W) array; 3: (H, W, 3)), after the EXIF
    orientation (a 90 degree rotation swaps H and W). Works for PNG too.

    Raises:
        ImageError: the bytes are not an image, the header is unreadable or declares too many pixels.
    """
    kind = _format_of(data)
    if kind == "jpeg":
        height, width, components, _, orient = _jpeg_header(data)
        channels = 1 if components == 1 else 3
    else:
        height, width, channels, orient = _pillow_header(kind, data)
    _check_size(height, width)
    return (width, height, channels) if _swaps_axes(orient) else (height, width, channels)


def decode_other(data: bytes) -> np.ndarray:
    """Decode a JPEG, WebP, BMP, TIFF or GIF to uint8 pixels (the policies are in the module docstring).

    Returns:
        (H, W) for a grayscale source, (H, W, 3) RGB for a colour one; C-contiguous, oriented.

    Raises:
        ImageError: the bytes are not a usable image of these formats (the message is the reason).
        ValueError: `data` is a PNG (`cnnkit.images.decode_image` decodes those).
    """
    kind = _format_of(data)
    if kind == "png":
        raise ValueError("PNG bytes: cnnkit.images.decode_image decodes those")
    arr, orient = _decode_jpeg(data) if kind == "jpeg" else _decode_pillow(kind, data)
    return _orient(arr, orient)


def _orient(arr: np.ndarray, orient: int) -> np.ndarray:
    """Apply an EXIF orientation: the stored pixels turned into the picture as it is meant to be seen."""
    import numpy as np

    if orient in (2, 4):  # mirrored left-right / top-bottom
        arr = arr[:, ::-1] if orient == 2 else arr[::-1]
    elif orient in (3, 7):  # rotated 180 / transverse (rotated 180, then transposed)
        arr = arr[::-1, ::-1]
    if orient in (5, 7):
        arr = arr.swapaxes(0, 1)
    elif orient in (6, 8):  # stored rotated: turn 90 degrees clockwise / counter-clockwise
        arr = np.rot90(arr, -1 if orient == 6 else 1)
    return np.ascontiguousarray(arr)


_SIMPLEJPEG: list = []  # [module] once imported, [None] when it is not installed


def _simplejpeg():
    if not _SIMPLEJPEG:
        try:
            import simplejpeg
        except ImportError:  # pragma: no cover - Pillow decodes every JPEG then
            simplejpeg = None
        _SIMPLEJPEG.append(simplejpeg)
    return _SIMPLEJPEG[0]


def _decode_jpeg(data: bytes) -> tuple[np.ndarray, int]:
    """(pixels, orientation): libjpeg-turbo through simplejpeg for 8-bit gray and YCbCr/RGB files, else Pillow.

    simplejpeg runs strict: a libjpeg warning (premature end, corrupt data) is a refusal, never a
    zero-filled or smeared image. Its other refusals (a layout libjpeg-turbo's TurboJPEG API does not
    take, e.g. an unusual subsampling) go to Pillow.
    """
    height, width, components, precision, orient = _jpeg_header(data)
    _check_size(height, width)
    simplejpeg = _simplejpeg()
    if simplejpeg is None or precision != 8 or components not in (1, 3):
        return _decode_pillow("jpeg", data, orient)
    try:
        arr = simplejpeg.decode_jpeg(data, "GRAY" if components == 1 else "RGB", strict=True)
    except ValueError as e:  # libjpeg's warnings (strict) are damage; anything else, a file it does not support
        if "Premature end" in str(e):
            raise ImageError("truncated JPEG") from None
        if str(e).startswith("Corrupt JPEG data: "):
            raise ImageError(f"corrupt JPEG: {str(e)[19:]}") from None
        return _decode_pillow("jpeg", data, orient)
    return (arr[:, :, 0] if components == 1 else arr), orient


# Pillow modes whose pixels are one gray value; every other mode becomes RGB.
_GRAY_MODES = frozenset(("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"))


@contextlib.contextmanager
def _pillow(kind: str, data: bytes) -> Iterator[None]:
    """Pillow's failures as one-line ImageErrors: bomb warnings and errors become "too large", the rest
    "truncated X" or "corrupt X: reason". Pillow's other warnings (e.g. corrupt EXIF in a TIFF) are
    silenced: the image either decodes or is refused with a reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"too large: over {Image.MAX_IMAGE_PIXELS:,} pixels (limit {MAX_PIXELS:,})") from None
    except UnidentifiedImageError:
        raise _pillow_error(kind, data, "header unreadable") from None
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise _pillow_error(kind, data, str(e).strip().split("\n")[0] or type(e).__name__) from None


def _pillow_error(kind: str, data: bytes, why: str) -> ImageError:
    name = _NAMES[kind]
    # A WebP's RIFF header holds its length: libwebp's own message for a short file is "could not create decoder".
    if kind == "webp" and len(data) >= 8 and len(data) < struct.unpack_from("<I", data, 4)[0] + 8:
        return ImageError("truncated WebP")
    return ImageError(f"truncated {name}" if "truncated" in why.lower() else f"corrupt {name}: {why}")


def _open_pillow(kind: str, data: bytes) -> Image.Image:
    """Pillow's lazy open (the header only) of bytes `sniff` named `kind`; the caller closes it."""
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data), formats=[_PILLOW_FORMATS[kind]])


def _pillow_header(kind: str, data: bytes) -> tuple[int, int, int, int]:
    """(height, width, channels, orientation) through Pillow's lazy open: the size as stored."""
    with _pillow(kind, data), _open_pillow(kind, data) as im:
        width, height = im.size
        if kind == "tiff":  # newer Pillow reports (and loads) a TIFF already oriented: take the stored size
            tags = getattr(im, "tag_v2", {})  # TiffImageFile's
            width, height = tags.get(256, width), tags.get(257, height)
        return height, width, 1 if im.mode in _GRAY_MODES else 3, _pillow_orientation(im)


def _pillow_orientation(im: Image.Image) -> int:
    value = im.getexif().get(0x0112, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _decode_pillow(kind: str, data: bytes, orient: int | None = None) -> tuple[np.ndarray, int]:
    """(pixels, orientation) through Pillow; `orient` when the caller has read it already (JPEG)."""
    with _pillow(kind, data), _open_pillow(kind, data) as im:
        _check_size(im.size[1], im.size[0])  # before load: nothing allocated yet
        im.load()  # the first frame or page only
        # Read after load: Pillow's libtiff path applies a TIFF's orientation itself and drops the tag.
        return _pixels(im, _NAMES[kind]), _pillow_orientation(im) if orient is None else orient


def _pixels(im: Image.Image, name: str) -> np.ndarray:
    """A loaded Pillow image as uint8 (H, W) gray or (H, W, 3) RGB."""
    import numpy as np

    mode = im.mode
    if mode == "F":
        raise ImageError(f"unsupported {name}: 32-bit float samples")
    if mode.startswith("I"):  # 16-bit (or 32-bit int) gray: the high byte of a 16-bit sample, as for PNG
        return (np.clip(np.asarray(im), 0, 0xFFFF) >> 8).astype(np.uint8)
    if mode not in ("L", "RGB"):
        try:
            im = im.convert("L" if mode in _GRAY_MODES else "RGB")
        except ValueError:
            raise ImageError(f"unsupported {name}: colour mode {mode}") from None
    return np.asarray(im)
