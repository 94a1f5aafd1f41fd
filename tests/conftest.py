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
