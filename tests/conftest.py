"""Shared fixtures: small PNG trees cut from the bundled MNIST digits (real images, no download)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnnkit.datasets.layout import write_tree
from cnnkit.datasets.sample import sample_arrays, split_sample


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _own_cnnkit_cache(tmp_path_factory):
    """cnnkit's own folder (downloads, the signing key of `cnnkit.provenance`) is the test session's,
    never the user's; subprocesses inherit it."""
    old = os.environ.get("CNNKIT_CACHE")
    os.environ["CNNKIT_CACHE"] = str(tmp_path_factory.mktemp("cnnkit-cache"))
    yield
    if old is None:
        os.environ.pop("CNNKIT_CACHE", None)
    else:
        os.environ["CNNKIT_CACHE"] = old


def make_tree(root: str, classes: tuple[int, ...], n_train: int, n_test: int) -> str:
    """Write ROOT/training and ROOT/testing with the first n images per class of each sample split."""
    images, labels = sample_arrays()
    train_idx, test_idx = split_sample(labels)
    names = [str(c) for c in classes]
    for split, idx, n in (("training", train_idx, n_train), ("testing", test_idx, n_test)):
        picked = np.concatenate([idx[labels[idx] == c][:n] for c in classes])
        remap = {c: i for i, c in enumerate(classes)}
        write_tree(root, split, images[picked], np.array([remap[int(v)] for v in labels[picked]]), names, ids=picked)
    return root


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory) -> str:
    """Three digit classes, 60 training and 20 testing images each."""
    return make_tree(os.fspath(tmp_path_factory.mktemp("tiny")), (0, 1, 2), 60, 20)


@pytest.fixture(scope="session")
def binary_tree(tmp_path_factory) -> str:
    """The lecture's task on the bundled digits: 0 vs 1, 400 training and 100 testing images each."""
    return make_tree(os.fspath(tmp_path_factory.mktemp("binary")), (0, 1), 400, 100)


DEFAULT_META = object()  # export_onnx's default: a record for the model's own classes


def export_onnx(
    path: str,
    classes: tuple[str, ...] = ("ant", "bee", "cat"),
    size: int = 28,
    seed: int = 0,
    meta: object = DEFAULT_META,
) -> str:
    """The lecture CNN with random weights (from `seed`), one output per class, exported to ONNX the
    way cnnkit's exporter does (dynamic batch axis, uint8 input), with a metadata record attached.

    `meta`: by default a `logits` record for `classes` and `size`; a `ModelMeta` or raw text to attach
    instead (a wrong or malformed record); None for no record at all.
    """
    import warnings

    torch = pytest.importorskip("torch")
    onnx = pytest.importorskip("onnx")
    from cnnkit.meta import METADATA_KEY, ModelMeta
    from cnnkit.models import build_model

    torch.manual_seed(seed)
    model, _ = build_model("lecture", len(classes), size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (torch.zeros((2, 1, size, size), dtype=torch.uint8),),
            path,
            dynamo=False,
            input_names=["images"],
            output_names=["output"],
            dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}},
        )
    if meta is DEFAULT_META:
        meta = ModelMeta(arch="lecture", classes=tuple(classes), input_shape=(1, size, size), output="logits")
    if meta is not None:
        proto = onnx.load(path)
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, meta.to_json() if isinstance(meta, ModelMeta) else str(meta)
        onnx.save(proto, path)
    return path


@pytest.fixture(scope="session")
def onnx_model_factory(tmp_path_factory):
    """`make(seed=0)` -> path of a 3-class ("ant", "bee", "cat") 28 x 28 ONNX model, built once per seed."""
    folder = tmp_path_factory.mktemp("onnx-models")
    made: dict[int, str] = {}

    def make(seed: int = 0) -> str:
        if seed not in made:
            made[seed] = export_onnx(str(folder / f"model-{seed}.onnx"), seed=seed)
        return made[seed]

    return make
