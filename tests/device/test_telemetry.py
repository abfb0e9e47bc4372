"""Telemetry records aggregates only."""

import json

import numpy as np
import pytest

from device_agents import InputMismatchError, Model
from device_agents.serving.telemetry import Telemetry


def test_telemetry_records_aggregates_only(int8_out, tmp_path, digits):
    model = Model.load(int8_out / "model.tflite")
    telemetry = Telemetry(model_version="v1")
    for i in range(20):
        with telemetry.measure():
            model.predict(digits.x[i])
    with pytest.raises(InputMismatchError), telemetry.measure():
        model.predict(np.zeros((1, 3)))
    path = telemetry.write(tmp_path / "t.json")
    snap = json.loads(path.read_text())
    assert set(snap) == {"model_version", "inferences", "samples", "errors", "latency_ms", "peak_rss_mib", "uptime_s"}
    assert snap["inferences"] == 20 and snap["errors"] == 1
    assert 0 < snap["latency_ms"]["p50"] <= snap["latency_ms"]["p90"] <= snap["latency_ms"]["p99"]
