"""The ServerApps' plumbing without Flower processes: the job runner writes every job's result (or its one-line
reason), the run folder's typed run.json, a served folder that is not being served, and fl up's refusals."""

import json
from types import SimpleNamespace

import pytest

from edgekit.errors import InputError, OutputError
from edgekit.federated.config import DeployConfig, Partition, PartitionScheme, RoundSettings
from edgekit.federated.deploy import up
from edgekit.federated.run import RunSpec
from edgekit.federated.server_apps import job_server_app
from edgekit.federated.submit import SERVE_STATE, served


def _run_job(app, job_path):
    # Flower calls the registered main with its grid and the run's context; here neither needs Flower
    app._main(None, SimpleNamespace(run_config={"job": str(job_path)}))
    return json.loads((job_path.parent / "result.json").read_text())


def test_the_job_runner_writes_each_actions_result_and_a_failing_jobs_reason(tmp_path):
    seen = []

    def status(grid, job):
        seen.append(job)
        return {"status": "complete", "nodes": []}

    def broken(grid, job):
        raise ValueError("the release folder holds no manifest\nsecond line")

    app = job_server_app({"status": status, "broken": broken})
    for action in ("status", "broken"):
        (tmp_path / action).mkdir()
        (tmp_path / action / "job.json").write_text(json.dumps({"action": action, "timeout": 5}))
    assert _run_job(app, tmp_path / "status" / "job.json") == {"status": "complete", "nodes": []}
    assert seen == [{"action": "status", "timeout": 5}]
    failed = _run_job(app, tmp_path / "broken" / "job.json")
    assert failed == {"status": "error", "reason": "ValueError: the release folder holds no manifest"}
    assert "Traceback" in (tmp_path / "broken" / "traceback.txt").read_text()


def test_run_json_round_trips_every_field_a_server_app_reads(tmp_path):
    spec = RunSpec(clients=4, rounds=RoundSettings(rounds=3, local_epochs=2, seed=5), personalize_epochs=1,
                   partition=Partition(PartitionScheme.DIRICHLET, 0.3), insecure=True)
    spec.write(tmp_path)
    assert RunSpec.read(tmp_path) == spec
    written = json.loads((tmp_path / "run.json").read_text())
    assert written["partition"] == {"scheme": "dirichlet", "alpha": 0.3} and written["rounds"]["rounds"] == 3
    fleet = RunSpec(clients=2, rounds=RoundSettings(), fleet=str(tmp_path / "fleet"))
    assert RunSpec.from_json(fleet.to_json()).fleet == str(tmp_path / "fleet")


def test_a_folder_is_served_only_while_its_superlink_answers(tmp_path):
    from device_agents.federated.join import free_port

    with pytest.raises(InputError, match="is not a served fleet"):
        served(tmp_path)
    (tmp_path / SERVE_STATE).write_text(json.dumps({"control": f"127.0.0.1:{free_port()}", "gateway": "x"}))
    with pytest.raises(InputError, match="is not being served \\(nothing answers on 127.0.0.1:"):
        served(tmp_path)


def test_fl_up_refuses_a_folder_it_did_not_write_before_starting_anything(fl_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(OutputError):
        up(fl_model, "digits", out, config=DeployConfig(clients=2), progress=False, log=lambda *_: None)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
