"""Calibration and validation data: every accepted form, and a clear error for each kind of mismatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.calibration import RANDOM, load_samples, split_for_validation
from edgepack.errors import UsageError

IMAGE = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 8, 8]}]
TEXT = [
    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]},
]


def _images(n: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(dtype)


def test_npy_for_a_single_input_model_splits_along_the_batch_axis(tmp_path: Path):
    np.save(tmp_path / "x.npy", _images(6))
    samples = load_samples(tmp_path / "x.npy", IMAGE)
    assert len(samples.feeds) == 6
    assert samples.feeds[0]["image"].shape == (1, 3, 8, 8)
    assert samples.origin == str(tmp_path / "x.npy")


def test_npz_of_named_arrays_with_samples_on_a_new_axis(tmp_path: Path):
    ids = np.arange(4 * 1 * 5, dtype=np.int64).reshape(4, 1, 5)
    np.savez(tmp_path / "c.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    samples = load_samples(tmp_path / "c.npz", TEXT)
    assert len(samples.feeds) == 4
    assert samples.feeds[3]["input_ids"].shape == (1, 5)
    np.testing.assert_array_equal(samples.feeds[3]["input_ids"], ids[3])


def test_folder_of_npz_samples_in_name_order(tmp_path: Path):
    for i in range(3):
        np.savez(tmp_path / f"s{i}.npz", image=np.full((1, 3, 8, 8), i, dtype=np.float32))
    samples = load_samples(tmp_path, IMAGE)
    assert [float(f["image"][0, 0, 0, 0]) for f in samples.feeds] == [0.0, 1.0, 2.0]


def test_folder_with_one_npy_per_input(tmp_path: Path):
    np.save(tmp_path / "input_ids.npy", np.zeros((5, 7), dtype=np.int64))
    np.save(tmp_path / "attention_mask.npy", np.ones((5, 7), dtype=np.int64))
    samples = load_samples(tmp_path, TEXT)
    assert len(samples.feeds) == 5 and samples.feeds[0]["attention_mask"].shape == (1, 7)


def test_random_only_by_name_and_marked():
    samples = load_samples(RANDOM, IMAGE)
    assert samples.origin == "random" and len(samples.feeds) > 1
    assert samples.feeds[0]["image"].dtype == np.float32


def test_validation_is_held_out_from_the_calibration_samples(tmp_path: Path):
    np.save(tmp_path / "x.npy", _images(10))
    calibration, validation = split_for_validation(load_samples(tmp_path / "x.npy", IMAGE))
    assert len(calibration.feeds) == 8 and len(validation.feeds) == 2
    assert "held out" in validation.origin
    few_cal, few_val = split_for_validation(
        load_samples(tmp_path / "x.npy", IMAGE).__class__(calibration.feeds[:3], "three")
    )
    assert len(few_cal.feeds) == 3 and "themselves" in few_val.origin


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: np.savez(d / "c.npz", pixels=_images(2)), "missing input(s) image; unknown name(s) pixels"),
        (
            lambda d: np.save(d / "c.npy", _images(2, np.float64)),
            "input 'image': expected dtype float32, found float64",
        ),
        (lambda d: np.save(d / "c.npy", np.zeros((2, 3, 9, 8), np.float32)), "axis 2 is 9, the model needs 8"),
        (lambda d: np.save(d / "c.npy", np.zeros((2, 8), np.float32)), "expected shape [batch, 3, 8, 8]"),
    ],
    ids=["wrong-name", "wrong-dtype", "wrong-dim", "wrong-rank"],
)
def test_mismatches_name_the_input_and_what_was_expected(tmp_path: Path, make, expected):
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(UsageError) as info:
        load_samples(path, IMAGE)
    assert expected in str(info.value)
    assert str(path) in str(info.value)


def test_inputs_with_different_sample_counts(tmp_path: Path):
    np.savez(tmp_path / "c.npz", input_ids=np.zeros((3, 4), np.int64), attention_mask=np.ones((2, 4), np.int64))
    with pytest.raises(UsageError, match=r"different numbers of samples \(input_ids: 3, attention_mask: 2\)"):
        load_samples(tmp_path / "c.npz", TEXT)


def test_npy_for_a_model_with_two_inputs(tmp_path: Path):
    np.save(tmp_path / "c.npy", np.zeros((3, 4), np.int64))
    with pytest.raises(UsageError, match="the model has 2 inputs") as info:
        load_samples(tmp_path / "c.npy", TEXT)
    assert "npz" in info.value.hint


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "holds no .npz or .npy files"),
        (lambda d: (np.save(d / "a.npy", _images(1)), np.savez(d / "b.npz", image=_images(1))), "mixes .npz and .npy"),
        (lambda d: (d / "bad.npz").write_bytes(b"not a zip"), "cannot read calibration data"),
    ],
    ids=["empty-folder", "mixed-folder", "corrupt-file"],
)
def test_unusable_folders_and_files(tmp_path: Path, setup, expected):
    setup(tmp_path)
    with pytest.raises(UsageError, match=expected):
        load_samples(tmp_path, IMAGE)


def test_missing_path_mentions_the_accepted_forms(tmp_path: Path):
    with pytest.raises(UsageError) as info:
        load_samples(tmp_path / "nope", IMAGE, what="validation")
    assert "validation data not found" in str(info.value) and "random" in info.value.hint
