"""Training samples as the server and every device take them: numeric, finite samples and integer class labels.

One copy of the checks, for ``edgekit``'s data files (compress, trainable, fl) and a device's private data (``join``,
each federated round, :class:`~device_agents.training.trainer.Trainer`): a device refuses in one line what the server
would refuse, instead of failing inside its interpreter (one-hot labels), training on NaN, or truncating 1.7 to 1.

>>> class_labels(np.eye(3)[[2, 0, 1]], 3, "data.npz").tolist()    # one-hot labels: their class ids
[2, 0, 1]
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np

from device_agents.errors import InputMismatchError


def training_names(present: Collection[str]) -> tuple[str, str]:
    """The names of a data file's samples and labels among the arrays ``present``: ``x``/``y``, else ``x_train``/
    ``y_train`` as keras.datasets saves a split.

    >>> training_names({"x_train", "y_train", "x_test", "y_test"})
    ('x_train', 'y_train')
    """
    return ("x", "y") if "x" in present or "x_train" not in present else ("x_train", "y_train")


def read_labelled(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A device's private training data: the samples and class ids of an ``.npz`` (``x``/``y``, or ``x_train``/
    ``y_train`` as keras.datasets saves them; a test split beside them is not read), checked. Raises
    :class:`~device_agents.files.UnsafeFileError` for a file that is not a safe ``.npz`` within the size limit,
    :class:`InputMismatchError` for arrays a device cannot train on."""
    from device_agents.files import npz_names, read_npz

    x_name, y_name = training_names(npz_names(path))
    arrays = read_npz(path, names=(x_name, y_name))  # sizes checked before reading
    if x_name not in arrays or y_name not in arrays:
        raise InputMismatchError(
            f"{path} has no array '{y_name if x_name in arrays else x_name}': a device trains on samples and their "
            "labels; write them with numpy.savez(path, x=..., y=...) (or keras.datasets' x_train, y_train)")
    check_samples(arrays[x_name], str(path))
    return arrays[x_name], class_labels(arrays[y_name], len(arrays[x_name]), str(path))


def check_samples(x: np.ndarray, name: str) -> None:
    """Refuse samples that are not a numeric ``(samples, ...)`` array of at least one sample, or hold NaN/inf."""
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        text = " (for text, the token ids a vectorization layer outputs)" if x.dtype.kind in "USO" else ""
        raise InputMismatchError(f"{name}: x has dtype {x.dtype}; it must be a numeric array{text}")
    if x.ndim < 2 or len(x) == 0:
        raise InputMismatchError(f"{name}: x has shape {x.shape}; it must be (samples, ...) with at least one sample")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            first = int(np.argwhere(bad.reshape(len(x), -1).any(axis=1))[0][0])
            raise InputMismatchError(f"{name}: x holds {int(bad.sum())} NaN/inf values (first in sample {first}); "
                                     "clean or drop those samples")


def class_labels(y: np.ndarray, count: int, name: str) -> np.ndarray:
    """``y`` as one int64 class id per sample (``count`` samples): one-hot rows and an ``(n, 1)`` column are read as
    class ids, bools as 0/1; fractions, NaN, class names and other shapes are refused."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1 and np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all():
        y = y.argmax(axis=1)  # one-hot labels
    y = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if y.ndim != 1:
        raise InputMismatchError(f"{name}: y has shape {y.shape}; it must hold one integer class label per sample")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all():
            raise InputMismatchError(f"{name}: y holds NaN/inf; labels must be integer class ids")
        if not np.equal(np.mod(y, 1), 0).all():
            raise InputMismatchError(f"{name}: y holds non-integer values; labels must be integer class ids (edgekit "
                                     "trains and compresses classifiers, not models that predict values)")
    elif y.dtype.kind in "USO":  # class names: their order is the user's to choose
        raise InputMismatchError(f"{name}: y holds {y.dtype} values (class names?); labels must be integer class "
                                 "ids 0..K-1 in the order of the model's outputs, e.g. "
                                 "np.unique(y, return_inverse=True)[1]")
    elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):  # bool: a binary task's 0/1
        raise InputMismatchError(f"{name}: y has dtype {y.dtype}; labels must be integer class ids")
    if len(y) != count:
        raise InputMismatchError(f"{name}: x has {count} samples but y has {len(y)}; give one label per sample")
    return y.astype(np.int64)
