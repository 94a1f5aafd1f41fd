"""Color and size: what `--color`/`--size` record, and one preprocessing for training and inference."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cnnkit.batches import decode_batches
from cnnkit.images import convert_pixels, decode_image
from cnnkit.trainer.data import input_shape, load_split
from cnnkit.trainer.loop import TrainConfig, train


def _write(path, pixels: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path)


def color_tree(root, n: int = 12, size: tuple[int, int] = (12, 12), seed: int = 0) -> str:
    """Two classes that differ in hue only (red vs blue squares of random brightness), RGB PNGs."""
    rng = np.random.default_rng(seed)
    for split in ("training", "testing"):
        for label, channel in (("red", 0), ("blue", 2)):
            for i in range(n):
                img = np.zeros((*size, 3), np.uint8)
                img[..., channel] = rng.integers(120, 256)
                img[..., 1] = rng.integers(0, 60)
                _write(os.path.join(root, split, label, f"{i}.png"), img)
    return str(root)


def test_convert_pixels_rules():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray, converted = convert_pixels(rgb, (1, 5, 7))
    want = (rgb.astype(np.uint32) @ np.array([299, 587, 114]) + 500) // 1000
    assert converted and gray.shape == (1, 5, 7) and np.array_equal(gray[0], want)
    as_rgb, converted = convert_pixels(gray[0], (3, 5, 7))
    assert converted and as_rgb.shape == (3, 5, 7) and all(np.array_equal(as_rgb[c], gray[0]) for c in range(3))
    same, converted = convert_pixels(rgb, (3, 5, 7))
    assert not converted and np.array_equal(same, rgb.transpose(2, 0, 1))
    small, converted = convert_pixels(rgb, (3, 4, 4))
    pil = np.asarray(Image.fromarray(rgb).resize((4, 4), Image.Resampling.BILINEAR))
    assert converted and np.array_equal(small, pil.transpose(2, 0, 1))


def test_color_auto_and_size_come_from_the_training_images(tmp_path):
    root = color_tree(tmp_path / "c", size=(10, 14))
    files = [f"red/{i}.png" for i in range(12)]
    assert input_shape(f"{root}/training", files) == (3, 10, 14)
    assert input_shape(f"{root}/training", files, "gray") == (1, 10, 14)
    assert input_shape(f"{root}/training", files, "auto", (8, 8)) == (3, 8, 8)
    _write(f"{root}/training/red/odd.png", np.zeros((20, 20), np.uint8))  # sizes differ now: 28x28
    assert input_shape(f"{root}/training", [*files, "red/odd.png"], "gray") == (1, 28, 28)


def test_training_and_inference_decode_every_image_to_the_same_pixels(tmp_path):
    """The split training loads and the batches `cnnkit infer` decodes are equal, pixel for pixel, for
    mixed modes and sizes converted both ways."""
    root = color_tree(tmp_path / "c", n=4, size=(12, 12))
    _write(f"{root}/training/red/gray.png", np.arange(15 * 9, dtype=np.uint8).reshape(15, 9))
    folder = f"{root}/training"
    for shape in ((3, 12, 12), (1, 12, 12), (3, 9, 16), (1, 30, 30)):
        split = load_split(folder, ("blue", "red"), shape=shape, workers=0, progress=False)
        batches = list(decode_batches(folder, split.paths, shape, batch_size=3, workers=0))
        decoded = np.concatenate([b.images for b in batches])
        assert split.images.shape == (len(split.paths), *shape)
        assert np.array_equal(split.images, decoded)
        one = decode_image(open(os.path.join(folder, split.paths[0]), "rb").read(), shape)[0]
        assert np.array_equal(one, split.images[0])


@pytest.mark.parametrize("color, channels", [("auto", 3), ("gray", 1)])
def test_train_records_color_and_size_and_infer_applies_them(tmp_path, color, channels):
    from cnnkit.export import export
    from cnnkit.runtime.infer import infer
    from cnnkit.runtime.session import read_meta

    root = color_tree(tmp_path / "c", size=(12, 12))
    result = train(
        TrainConfig(
            data=root, arch="lecture", epochs=1, workers=0, color=color, size=(10, 10), runs_dir=str(tmp_path / "r")
        )
    )
    assert result.input_shape == [channels, 10, 10] and result.color == ("RGB" if channels == 3 else "L")
    out = export(os.path.join(result.run_dir, "best.pt"), data=f"{root}/testing")
    meta = read_meta(out.path)
    assert meta.input_shape == (channels, 10, 10) and meta.resize == "bilinear" and meta.color == result.color
    assert out.parity.passed
    # A grayscale image for the RGB model and color ones for the gray model are converted, not refused.
    _write(f"{root}/testing/red/gray.png", np.full((12, 12), 200, np.uint8))
    res = infer(f"{root}/testing", out.path, output=str(tmp_path / "p.csv"), workers=0)
    assert res.n_images == 25 and res.n_failed == 0 and res.n_converted == 25
