"""Data: the embedded digits set, user ``.npz`` files, validation against a model, seeded splits.

A dataset is an ``x`` array of samples and an optional ``y`` array of integer class labels.
Nothing is downloaded: ``"digits"`` is scikit-learn's bundled copy of the UCI handwritten digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgekit.errors import DataError

DIGITS = "digits"


@dataclass(frozen=True)
class Dataset:
    """Samples ``x`` and optional integer labels ``y`` (``None`` when the user has none)."""

    x: np.ndarray
    y: np.ndarray | None
    name: str = "data"
    # the file's own test split (x_test/y_test beside x/y or x_train/y_train, as keras.datasets saves them): the
    # held-out samples a command evaluates on when it is given no other evaluation data
    held_out: Dataset | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise DataError(
                f"{self.name}: x has {len(self.x)} samples but y has {len(self.y)}; "
                "give one label per sample"
            )

    def __len__(self) -> int:
        return len(self.x)

    def take(self, index: np.ndarray, name: str | None = None) -> Dataset:
        """Return the samples at ``index`` as a new dataset."""
        return Dataset(self.x[index], None if self.y is None else self.y[index], name or self.name)


@dataclass(frozen=True)
class Splits:
    """The three disjoint parts edgekit uses: fine-tuning, calibration and evaluation."""

    finetune: Dataset
    calibration: Dataset
    evaluation: Dataset


def load_digits(image_size: int = 8, channels: int = 1) -> Dataset:
    """Load scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as float32 in [0, 1].

    ``image_size`` and ``channels`` resize the images (bilinear) and repeat the gray channel,
    e.g. ``load_digits(96, 3)`` for a MobileNet-style input.

    >>> ds = load_digits()
    >>> ds.x.shape, ds.y.shape
    ((1797, 8, 8, 1), (1797,))
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    if image_size != 8:
        x = _resize_bilinear(x, image_size)
    if channels != 1:
        x = np.repeat(x, channels, axis=-1)
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), bunch.target.astype(np.int64), DIGITS)


def _resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    n, h, w, c = x.shape
    ys = np.linspace(0, h - 1, size)
    xs = np.linspace(0, w - 1, size)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
    bottom = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


TEST_SPLIT = ("x_test", "y_test")
"""A file's own test split, beside its data (``x``/``y``, or ``x_train``/``y_train`` as keras.datasets splits data and
Keras's own ``mnist.npz`` holds it): the held-out samples every accuracy is measured on (:attr:`Dataset.held_out`)."""


def load_npz(path: str | Path, *, require_labels: bool = False) -> Dataset:
    """Load an ``.npz`` file holding ``x`` (samples) and optionally ``y`` (integer labels), or ``x_train`` and
    ``y_train`` as keras.datasets names them; ``x_test``/``y_test`` beside either are its :attr:`Dataset.held_out`
    test split (:data:`TEST_SPLIT`). A single ``.npy`` array is read as ``x`` (samples without labels).

    Sizes are checked from the array headers before anything is allocated (at most
    :func:`device_agents.files.max_array_bytes` for all arrays together; ``EDGEKIT_MAX_ARRAY_BYTES`` sets it),
    and nothing is unpickled.
    """
    from device_agents.files import MAX_ARRAY_BYTES, UnsafeFileError, max_array_bytes, npz_names, read_npz
    from device_agents.training.samples import training_names

    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"  # a folder of images, say: edgekit reads arrays
        raise DataError(f"data file {path} {what}; give an .npz file with arrays 'x' and 'y', or 'digits'")
    present = npz_names(path)
    x_name, y_name = training_names(present)
    try:
        arrays = read_npz(path, names=(x_name, y_name, *TEST_SPLIT), max_bytes=max_array_bytes(MAX_ARRAY_BYTES),
                          single_array="x")  # a single .npy array is samples without labels
    except UnsafeFileError as exc:
        raise DataError(str(exc)) from None
    if x_name not in arrays:
        raise DataError(f"{path} has no array 'x' (it has: {', '.join(sorted(present)) or 'none'}); "
                        "save samples as x, labels as y: np.savez(path, x=..., y=...)")
    if y_name not in arrays and require_labels:
        raise DataError(f"{path} has no array '{y_name}'; labels are needed here: np.savez(path, {x_name}=..., "
                        f"{y_name}=...)")
    name = str(path) if x_name == "x" else f"{path} (x_train)"
    data = _check_arrays(arrays[x_name], arrays.get(y_name), name)
    return data if "x_test" not in arrays else replace(data, held_out=_test_split(arrays, data, path, y_name))


def _test_split(arrays: dict[str, np.ndarray], data: Dataset, path: Path, y_name: str) -> Dataset:
    """The file's ``x_test``/``y_test``, checked against its data: labelled when the data is, samples of one shape."""
    if (y_name in arrays) != ("y_test" in arrays):
        have, lack = (y_name, "y_test") if y_name in arrays else ("y_test", y_name)
        raise DataError(f"{path} has {have} but no {lack}; give labels for both splits or for neither")
    test = _check_arrays(arrays["x_test"], arrays.get("y_test"), f"{path} (x_test)")
    if test.x.shape[1:] != data.x.shape[1:]:
        raise DataError(f"{path}: the data's samples have shape {data.x.shape[1:]} but x_test's "
                        f"{test.x.shape[1:]}; both splits must hold samples of one shape")
    return test


def _check_arrays(x: np.ndarray, y: np.ndarray | None, name: str) -> Dataset:
    from device_agents.errors import InputMismatchError
    from device_agents.training.samples import check_samples, class_labels

    try:
        check_samples(x, name)
        return Dataset(x, None if y is None else class_labels(y, len(x), name), name)
    except InputMismatchError as exc:
        raise DataError(str(exc)) from None


def load_data(source: str | Path | Dataset, *, require_labels: bool = False) -> Dataset:
    """Load ``"digits"``, an ``.npz`` path, or pass a :class:`Dataset` through.

    >>> load_data("digits").x.dtype
    dtype('float32')
    """
    if isinstance(source, Dataset):
        checked = _check_arrays(source.x, source.y, source.name)
        return checked if source.held_out is None else replace(checked, held_out=load_data(source.held_out))
    if str(source) == DIGITS:
        return load_digits()
    return load_npz(source, require_labels=require_labels)


def shape_text(sample_shape: tuple[int | None, ...]) -> str:
    """A model's input shape as errors and notes write it: ``(n, ?, ?, 3)``, ``?`` for a free dimension.

    >>> shape_text((None, None, 3))
    '(n, ?, ?, 3)'
    """
    return "(n, " + ", ".join("?" if d is None else str(d) for d in sample_shape) + ")"


def fit_to_model(data: Dataset, input_shape: tuple[int | None, ...], input_dtype: str, num_classes: int) -> Dataset:
    """Check that ``data`` fits a model's input and output, and cast ``x`` to the input dtype.

    ``input_shape`` excludes the batch dimension; ``None`` entries accept any size.
    """
    from device_agents.serving.runtime import reshape_hint

    x = data.x
    sample_shape = tuple(x.shape[1:])
    if len(sample_shape) == len(input_shape) - 1 and input_shape[-1] == 1:
        x = x[..., None]  # (n, h, w) images for a (h, w, 1) input
        sample_shape = tuple(x.shape[1:])
    if len(sample_shape) != len(input_shape) or any(
        want is not None and want != got for want, got in zip(input_shape, sample_shape)
    ):
        if data.name == DIGITS:  # the embedded default: the user may not know they gave it
            raise DataError(f"the model expects {shape_text(input_shape)}, and the embedded default data "
                            f"(scikit-learn's digits, {shape_text(sample_shape)}) does not fit it; give the model's "
                            "own data as an .npz with x (samples) and y (labels)")
        raise DataError(
            f"{data.name}: x has shape {x.shape} but the model expects {shape_text(input_shape)}; "
            f"{reshape_hint(sample_shape, input_shape)}"
        )
    if np.issubdtype(np.dtype(input_dtype), np.integer):
        x = _integers(x, np.dtype(input_dtype), data.name)
    else:
        x = x.astype(np.float32)
    if data.y is not None:
        y = data.y
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise DataError(
                f"{data.name}: labels range over [{lo}, {hi}] but the model has {num_classes} classes "
                f"(valid labels 0..{num_classes - 1}); check y or the model's output layer"
            )
    return Dataset(x, data.y, data.name)


def _integers(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """``x`` as the model's integer input dtype: whole numbers its dtype holds (a cast would wrap 300 to 44 in uint8
    and truncate 0.5 to 0), else :class:`DataError`."""
    if np.issubdtype(x.dtype, np.floating) and not np.equal(np.mod(x, 1), 0).all():
        raise DataError(f"{name}: the model takes integers ({dtype}: pixels or token ids) but x holds fractional "
                        "values; give x as the model was trained on it")
    info = np.iinfo(dtype)
    if x.size and (x.min() < info.min or x.max() > info.max):
        raise DataError(f"{name}: x ranges over [{x.min():g}, {x.max():g}], outside what the model's {dtype} input "
                        f"holds ({info.min}..{info.max})")
    return x.astype(dtype)


def split(data: Dataset, *, seed: int = 0, eval_data: Dataset | None = None,
          eval_fraction: float = 0.2, calibration_size: int = 256) -> Splits:
    """Split reproducibly into fine-tune / calibration / evaluation parts (stratified when labelled).

    With ``eval_data`` the evaluation part is that set and ``data`` is split into the other two.

    >>> s = split(load_digits(), seed=0)
    >>> len(s.finetune), len(s.calibration), len(s.evaluation)
    (1182, 256, 359)
    """
    n = len(data)
    if n < 10:
        raise DataError(f"{data.name}: {n} sample{' is' if n == 1 else 's are'} too few to split; give at least 10")
    index = np.arange(n)
    if eval_data is None:
        n_eval = max(1, int(round(n * eval_fraction)))
        rest, eval_idx = _split_index(index, data.y, n_eval, seed)
        evaluation = data.take(np.sort(eval_idx), "evaluation")
    else:
        rest, evaluation = index, eval_data
    n_cal = min(calibration_size, max(1, len(rest) // 5))
    tune_idx, cal_idx = _split_index(rest, None if data.y is None else data.y[rest], n_cal, seed + 1)
    return Splits(data.take(np.sort(tune_idx), "finetune"), data.take(np.sort(cal_idx), "calibration"), evaluation)


def _split_index(index: np.ndarray, y: np.ndarray | None, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    stratify = None
    if y is not None:
        counts = np.bincount(y - y.min())
        counts = counts[counts > 0]
        if counts.min() >= 2 and n_second >= len(counts) and len(index) - n_second >= len(counts):
            stratify = y
    first, second = train_test_split(index, test_size=n_second, random_state=seed, stratify=stratify)
    return first, second


def partition(data: Dataset, num_parts: int, *, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[Dataset]:
    """Split ``data`` among ``num_parts`` clients: ``"iid"`` or ``"dirichlet"`` (label skew, ``alpha``)."""
    if num_parts < 1:
        raise DataError(f"cannot partition into {num_parts} parts; give at least 1")
    if num_parts > len(data):
        raise DataError(f"{len(data)} samples cannot give {num_parts} clients one sample each; use fewer clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid" or data.y is None:
        parts = np.array_split(rng.permutation(len(data)), num_parts)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
        parts_l: list[list[int]] = [[] for _ in range(num_parts)]
        for label in np.unique(data.y):
            idx = rng.permutation(np.flatnonzero(data.y == label))
            shares = rng.dirichlet(np.full(num_parts, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts_l, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        for part in parts_l:  # every client gets at least one sample
            if not part:
                donor = max(range(num_parts), key=lambda j: len(parts_l[j]))
                part.append(parts_l[donor].pop())
        parts = [np.array(sorted(p)) for p in parts_l]
    else:
        raise DataError(f"unknown partition scheme {scheme!r}; use 'iid' or 'dirichlet'")
    return [data.take(np.sort(p), f"{data.name}[{i}]") for i, p in enumerate(parts)]
