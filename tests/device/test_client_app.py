"""The device's ClientApp against a hostile server: steering, probing, int4 updates, down-link deltas, the
personal head."""

from pathlib import Path

import numpy as np
import pytest

from device_agents.federated import codec


def _message(content, message_type, node=1):
    import time

    from flwr.app import Message, Metadata

    metadata = Metadata(run_id=1, message_id=f"m{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type=message_type)
    return Message(content, metadata=metadata)


@pytest.fixture(scope="module")
def device(fl_model, digits, tmp_path_factory):
    """A device's ClientApp with its own data, driven directly with crafted server messages."""
    from flwr.app import Context, RecordDict

    from device_agents.federated.client_app import ClientSettings, make_client_app
    from edgekit import TrainableConfig, export_trainable

    d = tmp_path_factory.mktemp("device")
    export_trainable(fl_model, d / "trainable", config=TrainableConfig(batch_size=16), progress=False)
    (d / "data").mkdir()
    np.savez(d / "data" / "0.npz", x=digits.x[:100], y=digits.y[:100])
    app = make_client_app(ClientSettings(str(d / "trainable"), str(d / "data")))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "artifact-dir": str(d / "trainable")},
                      state=RecordDict(), run_config={})
    from device_agents.training.trainer import Trainer

    return app, context, Trainer.load(d / "trainable").get_weights()


def _train_message(weights, **config):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    return _message(RecordDict({"arrays": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}),
                                "config": ConfigRecord(config)}), "train")


def test_a_hostile_server_cannot_steer_or_probe_the_device(device):
    from flwr.app import Array, ArrayRecord, RecordDict

    from device_agents.federated.wire import round_settings
    from device_agents.protocol import ClientLimits

    app, context, weights = device
    for config, fragment in (({"learning-rate": float("nan")}, "learning-rate nan is not a finite number"),
                             ({"local-epochs": float("inf")}, "local-epochs inf is not a finite number"),
                             ({"learning-rate": -1.0}, "learning-rate -1.0 is not positive"),
                             ({"momentum": 1.0}, r"momentum 1.0 is not in \[0, 1\)"),
                             ({"momentum": float("nan")}, "momentum nan is not a finite number"),
                             ({"learning-rate": 0.01, "dp-clipping": "ignore"}, "dp-clipping 'ignore'")):
        with pytest.raises(ValueError, match=fragment):  # Flower turns it into an error reply
            app(_train_message(weights, **config), context)
    huge = {**weights, "extra": np.zeros((4096, 4096), np.float32)}
    with pytest.raises(ValueError, match="not this model's"):
        app(_train_message(huge, **{"learning-rate": 0.01}), context)
    wrong = {**weights, next(iter(weights)): np.zeros(7, np.float64)}
    with pytest.raises(ValueError, match=r"as float64 \(7,\), expected float32"):
        app(_train_message(wrong, **{"learning-rate": 0.01}), context)
    # documented caps, and the node config sets them
    capped = round_settings({"local-epochs": 50, "learning-rate": 9.0, "proximal-mu": 1e9, "momentum": 0.99},
                            ClientLimits())
    assert (capped.epochs, capped.learning_rate, capped.mu, capped.momentum) == (10, 1.0, 10.0, 0.9)
    assert round_settings({"local-epochs": 50}, ClientLimits.from_node_config({"max-local-epochs": 3})).epochs == 3
    assert round_settings({"momentum": 0.5}, ClientLimits.from_node_config({"max-momentum": 0.0})).momentum == 0.0
    assert not app(_train_message(weights, **{"local-epochs": 50, "learning-rate": 0.01}), context).has_error()
    # evaluation: only the weights last trained from, once, with coarse metrics
    probe = {k: np.zeros_like(v) for k, v in weights.items()}
    evaluate = _message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in probe.items()})}), "evaluate")
    with pytest.raises(ValueError, match="once per train round"):
        app(evaluate, context)
    app(_train_message(weights, **{"learning-rate": 0.01}), context)
    last = _message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()})}), "evaluate")
    metrics = app(last, context).content["metrics"]
    assert metrics["eval-accuracy"] % 5 == 0 and metrics["num-examples"] % 10 == 0
    with pytest.raises(ValueError, match="once per train round"):
        app(last, context)  # the same probe twice: refused


def test_int4_device_updates_decode_carry_their_error_and_hostile_ones_are_rejected(device):
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from device_agents.federated.wire import RESIDUAL
    from device_agents.protocol import Codec
    from edgekit.federated.downlink import payload_bytes
    from edgekit.federated.server_app import validate_reply

    app, context, weights = device
    if RESIDUAL in context.state:
        del context.state[RESIDUAL]
    config = {"learning-rate": 0.05, "seed": 3}
    trained = app(_train_message(weights, **config, **{"compress-updates": "float32"}), context).content
    truth = {k: v.numpy() for k, v in trained["arrays"].items()}
    reply = app(_train_message(weights, **config, **{"compress-updates": "int4"}), context).content
    assert payload_bytes(trained) / payload_bytes(reply) >= 7.0
    decoded, why = validate_reply(reply, weights, Codec.INT4)
    assert why == ""
    kept = {k: v.numpy().reshape(weights[k].shape) for k, v in context.state[RESIDUAL].items()}
    for k in weights:  # the same training (same seed): sent + kept = the trained weights
        assert np.allclose(decoded[k] + kept[k], truth[k], atol=1e-5)
    second = app(_train_message(weights, **config, **{"compress-updates": "int4"}), context).content
    decoded2, _ = validate_reply(second, weights, Codec.INT4)
    kept2 = {k: v.numpy().reshape(weights[k].shape) for k, v in context.state[RESIDUAL].items()}
    for k in weights:  # the next update carries the first one's rounding error
        assert np.allclose(decoded2[k] + kept2[k], truth[k] + kept[k], atol=1e-5)

    def tampered(**records):
        from flwr.app import RecordDict

        content = RecordDict({"metrics": reply["metrics"], "arrays": reply["arrays"], "codec": reply["codec"]})
        for name, value in records.items():
            content[name] = value
        return validate_reply(content, weights, Codec.INT4)[1]

    packed, scales = reply["arrays"]["int4"].numpy(), reply["codec"]["scales"].numpy()
    assert tampered(codec=ArrayRecord({"scales": Array(np.full_like(scales, 1e30))})) == "invalid codec scales"
    assert tampered(codec=ArrayRecord({"scales": Array(np.full_like(scales, np.nan))})) == "invalid codec scales"
    assert "exactly one tensor 'scales'" in tampered(codec=ConfigRecord({"scales": 0.1}))
    assert f"expected uint8 ({packed.size},)" in tampered(arrays=ArrayRecord({"int4": Array(packed[:-1])}))
    assert "is int8" in tampered(arrays=ArrayRecord({"int4": Array(packed.view(np.int8))}))
    assert "exactly one tensor 'int4'" in tampered(arrays=ArrayRecord({k: Array(v) for k, v in weights.items()}))
    assert "records" in validate_reply(reply, weights, Codec.FLOAT32)[1]  # a codec the round did not ask for
    from flwr.app import MetricRecord

    for rate, why in ((0.0, "learning-rate is not positive"), (-0.1, "learning-rate is not positive"),
                      (float("nan"), "metric learning-rate is nan, not a finite float")):
        assert tampered(metrics=MetricRecord({**dict(reply["metrics"]), "learning-rate": rate})) == why


def test_the_global_model_goes_down_as_an_int8_delta_to_devices_that_hold_the_last_one(device):
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from edgekit.federated.downlink import Downlink, payload_bytes

    app, context, weights = device
    link = Downlink()
    first = link.advance(weights)  # round 1: nobody holds a model, float32 to all
    message = _train_message(first, **{"learning-rate": 0.01, "compress-updates": "int8"})
    link.compress([message])
    assert message.content["arrays"][next(iter(weights))].dtype == "float32"
    reply = app(message, context)
    assert "codec" in reply.content
    link.settle({1})  # the device replied compressed: it holds the broadcast model
    moved = {k: v + np.float32(0.01) * np.sign(v) for k, v in weights.items()}  # the next global model
    second = link.advance(moved)
    message = _train_message(second, **{"learning-rate": 0.01, "compress-updates": "int8"})
    full = payload_bytes(message.content)
    link.compress([message])
    assert all(a.dtype == "int8" for a in message.content["arrays"].values())
    assert full / payload_bytes(message.content) > 3.5
    assert not app(message, context).has_error()
    held = {k: v.numpy() for k, v in context.state["codec-base"].items()}
    assert codec.digest(held) == codec.digest(second)  # the device rebuilt exactly what the server holds
    for k in weights:
        assert np.max(np.abs(second[k] - moved[k])) <= np.max(np.abs(moved[k] - first[k])) / 254 + 1e-7
    # a delta against a model the device does not hold, or a hostile delta, is refused
    stale = RecordDict({"arrays": message.content["arrays"], "codec": message.content["codec"],
                        "config": ConfigRecord({**dict(message.content["config"].items()), "base-sha256": "0" * 64})})
    with pytest.raises(ValueError, match="a model this device does not hold"):
        app(_message(stale, "train"), context)
    digest = codec.digest(held)
    for arrays, scales, fragment in (
            ({k: Array(v.astype(np.float32)) for k, v in weights.items()}, 0.1, "expected int8"),
            ({k: Array(np.zeros(v.shape, np.int8)) for k, v in weights.items()}, float("nan"), "invalid scales")):
        hostile = RecordDict({"arrays": ArrayRecord(arrays), "codec": ConfigRecord({k: scales for k in weights}),
                              "config": ConfigRecord({"learning-rate": 0.01, "compress-updates": "int8",
                                                      "base-sha256": digest})})
        with pytest.raises(ValueError, match=fragment):
            app(_message(hostile, "train"), context)


def test_personalisation_trains_only_the_head_and_keeps_it_on_the_device(device, digits):
    """A device that only ever sees the digits 0 and 1: its own head fits its data better than the global one."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from device_agents.federated.client_app import _trainer
    from device_agents.federated.personalize import PERSONAL_HEAD
    from device_agents.training.trainer import Trainer

    app, shared, weights = device
    folder = Path(shared.node_config["artifact-dir"]).parent
    pick = np.flatnonzero(digits.y < 2)[:150]
    np.savez(folder / "data" / "1.npz", x=digits.x[pick], y=digits.y[pick])
    context = Context(run_id=1, node_id=2, node_config={**shared.node_config, "partition-id": 1}, state=RecordDict(),
                      run_config={})
    head = set(Trainer.load(context.node_config["artifact-dir"]).spec["head_tensors"])
    assert head == {"dense_kernel", "dense_bias", "dense_1_kernel", "dense_1_bias"}  # after the Flatten

    query = _message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                 "config": ConfigRecord({"personalize-epochs": 5, "learning-rate": 0.05, "seed": 1})}),
                     "query.personalize")
    metrics = app(query, context).content["metrics"]
    assert set(metrics.keys()) == {"num-examples", "accuracy-before", "accuracy-after", "kept"}
    assert metrics["accuracy-before"] % 5 == 0 and metrics["num-examples"] % 10 == 0
    kept = {k: v.numpy() for k, v in context.state[PERSONAL_HEAD].items()}
    assert metrics["kept"] == 1 and metrics["accuracy-after"] > metrics["accuracy-before"]
    assert set(kept) == head and all(not np.array_equal(kept[k], weights[k]) for k in head)
    after = _trainer(context.node_config["artifact-dir"]).get_weights()
    assert all(np.array_equal(after[k], weights[k]) for k in weights if k not in head)  # the backbone is frozen
