"""The README quotes docs/results/*.json, not memory: every headline number must match its file."""

from __future__ import annotations

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def _results(name: str) -> dict:
    with open(os.path.join(ROOT, "docs", "results", name), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize(
    "name, settings", [("train-fashion.json", ("default", "longer")), ("train-digits.json", ("default",))]
)
def test_readme_training_numbers_come_from_the_results_files(name, settings):
    readme, doc = _readme(), _results(name)
    assert doc["script"] == "scripts/bench_train.py" and doc["machine"]["cpu"]
    for label in settings:
        s = doc["settings"][label]
        assert len(s["runs"]) == 3 and [r["seed"] for r in s["runs"]] == [0, 1, 2]
        t, w = s["test_accuracy"], s["wall_seconds"]
        quoted = f"{t['mean']:.4f} ({t['min']:.4f}–{t['max']:.4f})"
        assert quoted in readme, f"{name} {label}: README should quote {quoted}"
        assert f"{w['mean']:.0f} s" in readme, f"{name} {label}: README should quote {w['mean']:.0f} s"
        for r in s["runs"]:  # selection was on validation: every run says so
            assert r["selection"]["split"] == "validation" and r["selection"]["epoch"] == r["selected_epoch"]


@pytest.mark.parametrize("name", ["infer-small-fashion.json", "infer-lecture-fashion.json"])
def test_readme_inference_numbers_name_a_trained_model(name):
    readme, doc = _readme(), _results(name)
    model = doc["model"]
    assert model["trained"] is True and model["parameters"] > 0 and model["arch"] in readme
    best = doc["summary"]["cnnkit"]["best_ips"]
    assert f"{best:,}" in readme, f"README should quote cnnkit's {best:,} img/s from {name}"


def test_readme_speed_ratio_comes_from_the_results_file():
    ratios = _results("train-fashion.json")["speed"]["ratios"]
    assert ", ".join(f"{r:.2f}×" for r in ratios) in _readme()
