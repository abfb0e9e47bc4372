import numpy as np
import pytest

from edgekit.errors import DataError
from edgekit.loading.data import Dataset, fit_to_model, load_data, load_digits, load_npz, partition, split


def test_digits_is_embedded_and_normalised():
    ds = load_digits()
    assert ds.x.shape == (1797, 8, 8, 1) and ds.x.dtype == np.float32
    assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
    assert set(np.unique(ds.y)) == set(range(10))


def test_digits_resized_for_mobilenet():
    ds = load_digits(96, 3)
    assert ds.x.shape == (1797, 96, 96, 3)
    assert np.allclose(ds.x[..., 0], ds.x[..., 2])


def test_split_is_seeded_disjoint_and_stratified(digits):
    a, b = split(digits, seed=3), split(digits, seed=3)
    assert np.array_equal(a.evaluation.x, b.evaluation.x)
    assert len(a.finetune) + len(a.calibration) + len(a.evaluation) == len(digits)
    assert np.bincount(a.evaluation.y).min() >= 30  # roughly 36 per class
    c = split(digits, seed=4)
    assert not np.array_equal(a.evaluation.y, c.evaluation.y)


def test_split_with_eval_data_keeps_it_whole(digits):
    ev = digits.take(np.arange(100), "ev")
    s = split(digits, eval_data=ev)
    assert s.evaluation is ev and len(s.finetune) + len(s.calibration) == len(digits)


def test_npz_round_trip_and_one_hot_labels(tmp_path):
    x = np.random.rand(20, 4).astype(np.float32)
    y = np.eye(3)[np.arange(20) % 3]
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_data(tmp_path / "d.npz")
    assert ds.y.tolist() == (np.arange(20) % 3).tolist()
    np.savez(tmp_path / "b.npz", x=x, y=np.arange(20) % 2 == 1)  # a binary task's labels saved as bool were refused
    ds = load_data(tmp_path / "b.npz")
    assert ds.y.dtype == np.int64 and ds.y.tolist() == (np.arange(20) % 2).tolist()


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(3)}, "has no array 'x'"),
    ({"x": np.array([[np.nan, 1.0]] * 3), "y": np.zeros(3)}, "NaN/inf"),
    ({"x": np.ones((3, 2)), "y": np.array([0.5, 1, 2])}, "non-integer"),
    ({"x": np.ones((3, 2)), "y": np.zeros(4)}, "x has 3 samples but y has 4"),
    ({"x": np.array([["a", "b"]] * 3)}, "numeric array"),
    ({"x": np.ones((3, 2)), "y": np.array(["cat", "dog", "cat"])},
     r"y holds <U3 values \(class names\?\); labels must be integer class ids 0..K-1 in the order of the model's "
     r"outputs, e.g. np.unique\(y, return_inverse=True\)\[1\]"),
])
def test_bad_npz_contents(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_a_keras_datasets_style_file_is_read_as_its_train_and_test_splits(tmp_path):
    x = np.random.default_rng(0).random((30, 4)).astype(np.float32)
    y = np.arange(30) % 3
    np.savez(tmp_path / "splits.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=np.eye(3)[y[20:]])
    data = load_data(tmp_path / "splits.npz", require_labels=True)
    assert np.array_equal(data.x, x[:20]) and data.y.tolist() == y[:20].tolist()
    assert np.array_equal(data.held_out.x, x[20:]) and data.held_out.y.tolist() == y[20:].tolist()  # one-hot read
    assert load_data(data).held_out is not None  # a Dataset passed through keeps its test split
    np.savez(tmp_path / "both.npz", x=x, y=y, x_train=x[:20], y_train=y[:20])  # x and y win: the file's own names
    assert len(load_data(tmp_path / "both.npz")) == 30 and load_data(tmp_path / "both.npz").held_out is None
    np.savez(tmp_path / "xy_test.npz", x=x[:20], y=y[:20], x_test=x[20:], y_test=y[20:])  # x/y beside a test split
    assert len(load_data(tmp_path / "xy_test.npz")) == 20 and len(load_data(tmp_path / "xy_test.npz").held_out) == 10
    np.savez(tmp_path / "train.npz", x_train=x, y_train=y)
    assert len(load_data(tmp_path / "train.npz")) == 30 and load_data(tmp_path / "train.npz").held_out is None
    for name, arrays, message in (
            ("half", {"x_train": x, "y_train": y, "x_test": x}, "has y_train but no y_test; give labels for both"),
            ("shape", {"x_train": x, "y_train": y, "x_test": x[:, :2], "y_test": y},
             r"the data's samples have shape \(4,\) but x_test's \(2,\)"),
            ("nan", {"x_train": x, "x_test": np.full((3, 4), np.nan)}, r"\(x_test\): x holds 12 NaN/inf values"),
            ("test-only", {"x_test": x, "y_test": y}, r"has no array 'x' \(it has: x_test, y_test\)")):
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(DataError, match=message):
            load_data(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "unlabelled.npz", x_train=x, x_test=x)
    with pytest.raises(DataError, match="has no array 'y_train'; labels are needed here"):
        load_data(tmp_path / "unlabelled.npz", require_labels=True)


def test_a_single_npy_array_is_samples_without_labels(tmp_path):
    """The device agent took `--input x.npy`; compress refused `--data x.npy` ("a single .npy array, not an .npz")."""
    x = np.random.default_rng(0).random((12, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    data = load_data(tmp_path / "x.npy")
    assert np.array_equal(data.x, x) and data.y is None and data.held_out is None
    with pytest.raises(DataError, match="x.npy has no array 'y'; labels are needed here"):
        load_data(tmp_path / "x.npy", require_labels=True)
    np.save(tmp_path / "objects.npy", np.array([object()] * 3, dtype=object))
    with pytest.raises(DataError, match="holds Python objects"):
        load_data(tmp_path / "objects.npy")


def test_corrupt_and_missing_npz(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"PK\x03\x04 not a zip after all")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_npz(tmp_path / "c.npz")
    (tmp_path / "b.npz").write_bytes(b"\x00\x01\x02\xff" * 8)
    with pytest.raises(DataError, match="is a binary file of another format, not an .npz archive"):
        load_npz(tmp_path / "b.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "none.npz")


def test_fit_to_model_checks_shape_labels_and_casts():
    ds = Dataset(np.random.rand(10, 8, 8).astype(np.float64), np.arange(10) % 10)
    fitted = fit_to_model(ds, (8, 8, 1), "float32", 10)
    assert fitted.x.shape == (10, 8, 8, 1) and fitted.x.dtype == np.float32
    with pytest.raises(DataError, match=r"expects \(n, 9, 9, 1\)"):
        fit_to_model(ds, (9, 9, 1), "float32", 10)
    with pytest.raises(DataError, match=r"labels range over \[0, 9\] but the model has 5 classes"):
        fit_to_model(ds, (8, 8, 1), "float32", 5)
    tokens = Dataset(np.array([[1.5, 2.0]] * 10), None)
    with pytest.raises(DataError, match=r"takes integers \(int32: pixels or token ids\)"):
        fit_to_model(tokens, (2,), "int32", 3)


def test_channels_in_another_order_and_integers_a_dtype_cannot_hold_are_named():
    """Channels-last samples for a channels-first model (a PyTorch export) were told to "reshape or resize"; floats
    for a uint8 model were "token ids", and 300.0 was cast to 44 silently."""
    x = np.zeros((4, 32, 32, 3), np.float32)
    with pytest.raises(DataError, match=r"channels first in the model\): transpose the samples, "
                                        r"np.transpose\(x, \(0, 3, 1, 2\)\)"):
        fit_to_model(Dataset(x, None), (3, 32, 32), "float32", 10)
    with pytest.raises(DataError, match=r"channels last in the model\): transpose the samples, "
                                        r"np.transpose\(x, \(0, 2, 3, 1\)\)"):
        fit_to_model(Dataset(np.zeros((4, 3, 32, 32)), None), (32, 32, 3), "float32", 10)
    pixels = np.array([[0.0, 17.0, 255.0]] * 2)
    assert fit_to_model(Dataset(pixels, None), (3,), "uint8", 2).x.dtype == np.uint8
    with pytest.raises(DataError, match=r"x ranges over \[0, 300\], outside what the model's uint8 input holds"):
        fit_to_model(Dataset(pixels + [0, 0, 45], None), (3,), "uint8", 2)
    with pytest.raises(DataError, match=r"the model takes integers \(uint8: pixels or token ids\) but x holds "
                                        r"fractional values"):
        fit_to_model(Dataset(pixels / 255, None), (3,), "uint8", 2)


def test_the_embedded_default_that_does_not_fit_says_it_is_the_default(tmp_path):
    """compress without data on a 32x32x3 model said "digits: x has shape (1797, 8, 8, 1) ...; reshape or resize the
    samples": a user who gave no data does not know which samples."""
    with pytest.raises(DataError, match=r"^the model expects \(n, 32, 32, 3\), and the embedded default data "
                                        r"\(scikit-learn's digits, \(n, 8, 8, 1\)\) does not fit it; give the "
                                        r"model's own data as an .npz with x \(samples\) and y \(labels\)$"):
        fit_to_model(load_data("digits"), (32, 32, 3), "float32", 10)
    np.savez(tmp_path / "mine.npz", x=np.zeros((4, 8, 8, 1), np.float32))
    with pytest.raises(DataError, match=r"mine.npz: x has shape \(4, 8, 8, 1\) but the model expects"):
        fit_to_model(load_data(tmp_path / "mine.npz"), (32, 32, 3), "float32", 10)


def test_too_few_samples_to_split_are_refused_with_the_count():
    for n, text in ((1, "1 sample is"), (9, "9 samples are")):
        with pytest.raises(DataError, match=rf"^tiny: {text} too few to split; give at least 10$"):
            split(Dataset(np.zeros((n, 4), np.float32), np.zeros(n, np.int64), "tiny"))


def test_partitions_cover_the_data(digits):
    iid = partition(digits, 10, scheme="iid", seed=0)
    assert sum(len(p) for p in iid) == len(digits)
    skew = partition(digits, 10, scheme="dirichlet", alpha=0.1, seed=0)
    assert sum(len(p) for p in skew) == len(digits) and min(len(p) for p in skew) >= 1
    # label skew: with alpha 0.1 most clients are dominated by few classes
    top_share = np.median([np.bincount(p.y).max() / len(p) for p in skew])
    assert top_share > 0.4
    with pytest.raises(DataError, match="unknown partition scheme"):
        partition(digits, 2, scheme="bogus")


def _npz_with_header(path, shape, payload: bytes, dtype="<f4", compress=False):
    """An .npz whose x.npy header declares ``shape`` but whose data is ``payload`` (headers can lie)."""
    import zipfile

    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as archive, archive.open("x.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": dtype, "fortran_order": False, "shape": shape})
        for start in range(0, len(payload), 1 << 24):
            member.write(payload[start:start + (1 << 24)])


def test_a_zip_bomb_is_refused_before_it_is_expanded(tmp_path, monkeypatch):
    """A 300 KB .npz that expands to 256 MiB, over a 64 MiB limit: refused from its header, nothing allocated."""
    import resource

    monkeypatch.setenv("EDGEKIT_MAX_ARRAY_BYTES", str(64 * 2**20))
    bomb = tmp_path / "bomb.npz"
    _npz_with_header(bomb, (2**26,), b"\0" * 2**28, compress=True)
    assert bomb.stat().st_size < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match=r"declares shape \(67108864,\) of float32 \(256 MiB.*limit is 64 MiB"):
        load_npz(bomb)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB: no 256 MiB spike


def test_a_lying_header_and_a_pickle_are_refused(tmp_path):
    _npz_with_header(tmp_path / "lie.npz", (10**9, 64), b"\0" * 100)
    with pytest.raises(DataError, match=r"declares shape \(1000000000, 64\)"):
        load_npz(tmp_path / "lie.npz")
    _npz_with_header(tmp_path / "short.npz", (1000,), b"\0" * 40)
    with pytest.raises(DataError, match=r"not a readable .npz \(or .npy\) file"):
        load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="holds Python objects"):
        load_npz(tmp_path / "obj.npz")


def test_a_csv_given_as_data_is_named_as_such(tmp_path):
    (tmp_path / "data.csv").write_text("pixel0,pixel1,label\n0.1,0.2,3\n")
    with pytest.raises(DataError, match=r"is a text file \(CSV\?\), not an .npz archive; write it with numpy.savez"):
        load_npz(tmp_path / "data.csv")
