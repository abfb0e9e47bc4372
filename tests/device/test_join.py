"""Joining the fleet: the device's own key pair, and the flower-supernode command join runs (checked inputs, the
app guard first on PATH, Flower's telemetry off)."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from device_agents.errors import InputMismatchError
from device_agents.federated.app_guard import TRUST_ENV
from device_agents.federated.join import make_node_key, supernode_command
from device_agents.protocol import FLOWER_ENV


@pytest.fixture
def device(tmp_path):
    from edgekit.federated.tls import make_certificates

    ca = make_certificates(tmp_path / "certs")["ca"]
    private, public = make_node_key(tmp_path / "keys", "device1")
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(4, np.int64))
    return ca, private, public, data, tmp_path / "store"


def test_the_node_key_is_private_from_the_start(device):
    _, private, public, _, _ = device
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().startswith("ecdsa-sha2-nistp256 ")
    assert b"PRIVATE KEY" in private.read_bytes()


def test_the_supernode_command_names_the_fleet_the_key_the_store_and_the_data(device):
    ca, private, _, data, store = device
    command, env = supernode_command("fleet.example:9092", ca, private, store, data=data)
    assert Path(command[0]).name == "flower-supernode"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--superlink"] == "fleet.example:9092" and flags["--root-certificates"] == str(ca.absolute())
    assert flags["--auth-supernode-private-key"] == str(private.absolute()) and flags["--host"] == "127.0.0.1"
    assert flags["--node-config"] == f'store="{store.absolute()}" data-file="{data.absolute()}"'
    assert all(env[key] == value for key, value in FLOWER_ENV.items())
    guard = Path(env["PATH"].split(os.pathsep)[0])
    assert guard == store.absolute() / ".flwr" / "guard" and (guard / "flwr-clientapp").is_file()
    assert env[TRUST_ENV] == str(store.absolute() / "trusted.pub")


@pytest.mark.parametrize("change, fragment", [
    ("address", "is not HOST:PORT"),
    ("key-mode", "readable by other users"),
    ("ca", "is not a PEM certificate"),
    ("data", "has no array 'x'"),
    ("no-labels", "has no array 'y': a device trains on samples and their labels"),
    ("nan", r"x holds 1 NaN/inf values \(first in sample 2\)"),
    ("fractions", "y holds non-integer values; labels must be integer class ids"),
    ("names", r"y holds <U3 values \(class names\?\)"),
])
def test_join_refuses_bad_inputs_before_starting_anything(device, change, fragment):
    """Data a round would refuse (no labels, NaN, fractional or named labels) joined the fleet and then failed every
    round on the device, or trained on NaN; join refuses it before starting anything."""
    ca, private, _, data, store = device
    address = "fleet.example" if change == "address" else "fleet.example:9092"
    if change == "key-mode":
        private.chmod(0o644)
    if change == "ca":
        ca = data
    x = np.zeros((4, 8, 8, 1), np.float32)
    if change == "data":
        np.savez(data, y=np.zeros(4))
    if change == "no-labels":
        np.savez(data, x=x)
    if change == "nan":
        x[2, 0, 0, 0] = np.nan
        np.savez(data, x=x, y=np.zeros(4))
    if change == "fractions":
        np.savez(data, x=x, y=np.array([0, 1, 1.5, 2]))
    if change == "names":
        np.savez(data, x=x, y=np.array(["cat", "dog", "cat", "dog"]))
    with pytest.raises(InputMismatchError, match=fragment):
        supernode_command(address, ca, private, store, data=data)
    assert not (store / ".flwr").exists()



def test_a_device_trains_on_a_keras_datasets_style_file_its_train_split_alone(device):
    """A device's data saved as keras.datasets splits it (x_train, y_train, x_test, y_test), as the server reads
    it, was refused by join ("has no array 'x'"), and every round failed on it. The device trains on its train split;
    its test split is not read."""
    from device_agents.training.samples import read_labelled

    ca, private, _, data, store = device
    rng = np.random.default_rng(0)
    x_train, x_test = rng.random((6, 8, 8, 1), np.float32), np.full((3, 8, 8, 1), np.nan, np.float32)
    np.savez(data, x_train=x_train, y_train=np.eye(3)[[0, 1, 2, 0, 1, 2]], x_test=x_test, y_test=np.zeros(3))
    supernode_command("fleet.example:9092", ca, private, store, data=data)  # no refusal
    x, y = read_labelled(data)  # what each round trains on
    np.testing.assert_array_equal(x, x_train)
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    np.savez(data, x_train=x_train, x_test=x_test)
    with pytest.raises(InputMismatchError, match=r"has no array 'y_train': a device trains on samples and their "
                                                 r"labels; write them with numpy.savez\(path, x=..., y=...\) \(or "
                                                 r"keras.datasets' x_train, y_train\)"):
        supernode_command("fleet.example:9092", ca, private, store, data=data)
