"""Compare the JPEG decoders cnnkit could use: simplejpeg, PyTurboJPEG and Pillow (the fallback).

Usage: python scripts/bench_jpeg.py [--repeats 200] [--results docs/results/jpeg-decoders.json]

Inputs: scikit-learn's bundled sample photos (`china.jpg`, `flower.jpg`, 427 x 640), re-encoded by
Pillow at quality 90 in three sizes: 28 x 28 (a dataset-sized image), 256 x 256 and 1024 x 768 (a
downsized phone photo), colour and gray. Each decoder decodes the same bytes to RGB (GRAY for gray
files) `--repeats` times after 5 warm-up calls, in turn; the table is the median time per decode
in microseconds, one thread (the decoders do not use more). `cnnkit.formats.decode_other` is timed
too: simplejpeg plus cnnkit's header walk and checks.

Why the decoders differ beyond speed: simplejpeg's wheels bundle libjpeg-turbo (manylinux x86-64
and aarch64, macOS, Windows; MIT licence, libjpeg-turbo's BSD-style licences); PyTurboJPEG (MIT) is a
ctypes wrapper that needs the system's libturbojpeg (apt install libturbojpeg0; PyTurboJPEG 2.x needs
libjpeg-turbo 3, PyTurboJPEG 1.x the 2.x that Debian 12 ships), so a plain `pip install` is not
enough; Pillow decodes with the libjpeg(-turbo) in its wheel through its generic plugin machinery.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from importlib import metadata

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine, write_results  # noqa: E402

SIZES = {"28x28": (28, 28), "256x256": (256, 256), "1024x768": (768, 1024)}  # name -> (height, width)


def _inputs() -> dict[str, bytes]:
    """name -> JPEG bytes: each sample photo resized to each size, colour and gray, quality 90."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = {}
    for photo in ("china.jpg", "flower.jpg"):
        img = Image.fromarray(load_sample_image(photo))
        for size, (h, w) in SIZES.items():
            for mode in ("RGB", "L"):
                buf = io.BytesIO()
                img.resize((w, h), Image.Resampling.LANCZOS).convert(mode).save(buf, "JPEG", quality=90)
                out[f"{photo[:-4]} {size} {'gray' if mode == 'L' else 'rgb'}"] = buf.getvalue()
    return out


def _decoders() -> dict[str, object]:
    """name -> decode(bytes, gray) for every decoder installed here."""
    from PIL import Image

    from cnnkit.formats import decode_other

    def pillow(data: bytes, gray: bool) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("L" if gray else "RGB"))

    found: dict[str, object] = {"pillow": pillow, "cnnkit.formats.decode_other": lambda data, gray: decode_other(data)}
    try:
        import simplejpeg

        found["simplejpeg"] = lambda data, gray: simplejpeg.decode_jpeg(data, "GRAY" if gray else "RGB")
    except ImportError:
        pass
    try:
        from turbojpeg import TJPF_GRAY, TJPF_RGB, TurboJPEG

        tj = TurboJPEG()
        found["pyturbojpeg"] = lambda data, gray: tj.decode(data, pixel_format=TJPF_GRAY if gray else TJPF_RGB)
    except (ImportError, RuntimeError, OSError) as e:
        print(f"pyturbojpeg: not measured ({str(e).splitlines()[0]})", file=sys.stderr)
    return found


def _median_us(fn, data: bytes, gray: bool, repeats: int) -> float:
    for _ in range(5):
        fn(data, gray)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn(data, gray)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def _versions() -> dict[str, str | None]:
    out = {}
    for dist in ("simplejpeg", "PyTurboJPEG", "pillow", "numpy", "scikit-learn"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        from PIL import features

        out["pillow jpeg library"] = features.version("jpg")
    except Exception:  # an old Pillow without features.version
        out["pillow jpeg library"] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--results", default=None, help="write the results JSON here")
    args = ap.parse_args()
    inputs, decoders = _inputs(), _decoders()
    table: dict[str, dict[str, float]] = {}
    for name, data in inputs.items():
        gray = name.endswith("gray")
        table[name] = {dec: round(_median_us(fn, data, gray, args.repeats), 1) for dec, fn in decoders.items()}
        print(f"{name:22} {len(data):7} B  " + "  ".join(f"{d} {t:8.1f} us" for d, t in table[name].items()))
    result = {
        "what": "median microseconds per JPEG decode, one thread",
        "command": "python " + " ".join(sys.argv),
        "machine": describe_machine(),
        "versions": _versions(),
        "repeats": args.repeats,
        "bytes": {name: len(data) for name, data in inputs.items()},
        "median_us": table,
    }
    if args.results:
        write_results(args.results, result)


if __name__ == "__main__":
    main()
