"""Secure aggregation (SecAgg+): the server sees only the aggregate."""

import pytest
from conftest import quiet

from edgekit.errors import InputError
from edgekit.federated.config import (
    RoundSettings,
    SimulationConfig,
)
from edgekit.federated.simulate import simulate

pytestmark = pytest.mark.xdist_group("federated-3")




def test_secure_aggregation_server_sees_only_the_aggregate(fl_model, tmp_path):
    result = simulate(fl_model, "digits", tmp_path / "secagg", progress=False, log=quiet,
                      config=SimulationConfig(clients=4, secure_aggregation=True, rounds=RoundSettings(rounds=2)))
    rounds = result.history[1:]
    assert [h["round"] for h in rounds] == [1, 2]
    # every result handed to the strategy carried the same unmasked sum, never a client's own update
    assert all(h["distinct_updates_seen_by_server"] == 1 for h in rounds)
    assert rounds[-1]["accuracy"] > result.history[0]["accuracy"]
    assert (tmp_path / "secagg" / "final" / "model.tflite").is_file()
    with pytest.raises(InputError, match="cannot be combined with update compression"):
        SimulationConfig(clients=4, secure_aggregation=True, rounds=RoundSettings(compress_updates=True))


def test_secagg_rounds_send_the_round_loops_train_config_which_the_device_obeys():
    """One train config for both server paths (SecAgg+ once lacked two keys), read back by the device's own parser."""
    import numpy as np

    from device_agents.federated.wire import round_settings
    from device_agents.protocol import ClientLimits, TrainConfig
    from edgekit.federated.secagg import secagg_strategy

    settings = RoundSettings(rounds=4, local_epochs=3, learning_rate=0.2, client_momentum=0.5, seed=7)
    strategy = secagg_strategy(settings, clients=4, initial=[np.zeros(3, np.float32)], evaluate=None, seen=[])
    config = strategy.on_fit_config_fn(2)
    assert config == settings.train_config(2)
    assert {TrainConfig.LOCAL_EPOCHS, TrainConfig.LEARNING_RATE, TrainConfig.MOMENTUM, TrainConfig.SEED,
            TrainConfig.COMPRESS_UPDATES, TrainConfig.DP_CLIPPING} <= set(config)
    local = round_settings(config, ClientLimits())
    assert (local.epochs, local.learning_rate, local.momentum, local.seed) == (
        3, settings.learning_rate_at(2), 0.5, 7 * 1000 + 2)
    capped = round_settings(config, ClientLimits(max_local_epochs=2, max_learning_rate=0.1))
    assert (capped.epochs, capped.learning_rate) == (2, 0.1)
