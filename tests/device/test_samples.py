"""The one check of training samples and labels the server (edgekit.loading.data) and every device share."""

import numpy as np
import pytest

from device_agents.errors import InputMismatchError
from device_agents.training.samples import check_samples, class_labels


@pytest.mark.parametrize("y, ids", [
    (np.array([2, 0, 1]), [2, 0, 1]),
    (np.eye(3)[[2, 0, 1]], [2, 0, 1]),                     # one-hot rows
    (np.array([[2], [0], [1]]), [2, 0, 1]),               # a column
    (np.array([2.0, 0.0, 1.0]), [2, 0, 1]),               # whole numbers saved as floats
    (np.array([True, False, True]), [1, 0, 1]),           # a binary task's bools
])
def test_labels_are_read_as_class_ids(y, ids):
    labels = class_labels(y, 3, "d.npz")
    assert labels.dtype == np.int64 and labels.tolist() == ids


@pytest.mark.parametrize("y, message", [
    (np.array([0.5, 1.0, 2.0]), "d.npz: y holds non-integer values"),
    (np.array([0.0, np.nan, 1.0]), "d.npz: y holds NaN/inf"),
    (np.array(["cat", "dog", "cat"]), r"y holds <U3 values \(class names\?\)"),
    (np.zeros((3, 2, 2)), r"y has shape \(3, 2, 2\); it must hold one integer class label per sample"),
    (np.array([0, 1]), "x has 3 samples but y has 2"),
    (np.array([1 + 1j, 0, 1]), "y has dtype complex128; labels must be integer class ids"),
])
def test_labels_that_are_not_class_ids_are_refused(y, message):
    with pytest.raises(InputMismatchError, match=message):
        class_labels(y, 3, "d.npz")


@pytest.mark.parametrize("x, message", [
    (np.array([[1.0, 2.0], [1.0, np.inf], [0.0, 0.0]]), r"x holds 1 NaN/inf values \(first in sample 1\)"),
    (np.array([["a", "b"]] * 3), r"dtype <U1; it must be a numeric array \(for text, the token ids"),
    (np.zeros(3), r"x has shape \(3,\); it must be \(samples, ...\)"),
    (np.zeros((0, 4)), "with at least one sample"),
])
def test_samples_that_cannot_be_trained_on_are_refused(x, message):
    with pytest.raises(InputMismatchError, match=message):
        check_samples(x, "d.npz")
    check_samples(np.zeros((3, 4), np.uint8), "d.npz")  # integer pixels are samples
