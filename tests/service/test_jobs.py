"""Jobs run by real Celery worker processes: end to end, cancel, time limit, duplicate
delivery, the sweeper. Each runs against the team setup and the embedded default."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import pytest
from sqlalchemy import update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Tiny pruning runs: seconds on 2 CPU cores. MIPP_TEST_DEVICE=cuda runs the jobs on a GPU.
DEVICE = os.environ.get("MIPP_TEST_DEVICE", "cpu")
FAST_MIPP = {
    "calibration_samples": 512,
    "repeats": 2,
    "reconstructor": {"epochs": 5, "finetune_epochs": 2, "ordering_epochs": 2},
    "retrain": {"epochs": 2, "batch_size": 128},
    "device": DEVICE,
}
QUICK_RANDOM = {"method": "random", "target": 0.5, "retrain": {"epochs": 1}, "device": DEVICE}
LONG_RANDOM = {"method": "random", "target": 0.5, "retrain": {"epochs": 5000, "batch_size": 16},
               "device": DEVICE}


@pytest.fixture
def inputs(service, digits_files):
    service.add_user("owner")
    model = service.upload_model("owner", digits_files["weights"])
    dataset = service.upload_dataset("owner", digits_files["npz"])
    return model["id"], dataset["id"]


def test_end_to_end_digits(service, digits_files, inputs, tmp_path):
    model_id, dataset_id = inputs
    submitted = time.monotonic()
    job = service.submit("owner", model_id, dataset_id, FAST_MIPP)
    # An idle worker may claim the job before the submit's answer is built.
    assert (job["status"], job["attempt"]) in {("queued", 0), ("running", 1)}, job
    seen: list = []
    done = service.wait("owner", job["id"], seen=seen)
    wall = time.monotonic() - submitted
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1 and done["progress"] == 1.0
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    running_phases = {phase for status, phase, _ in seen if status == "running"}
    assert running_phases & {"loading", "selecting", "retraining"}, seen
    assert any(0 < progress < 1 for status, _, progress in seen if status == "running"), seen

    metrics = done["metrics"]
    assert metrics["params"]["after"] < metrics["params"]["before"]
    api = service.api("owner")  # the project's client, through the in-process app
    layers = api.layers(job["id"])
    assert [layer["name"] for layer in layers] == ["fc1", "fc2", "fc3"]
    assert all(layer["units_after"] <= layer["units_before"] for layer in layers)
    assert "mi_estimate" in layers[0]["details"]
    # The tol and the units per layer are fields of the job itself.
    assert done["tol"] == pytest.approx(0.05) and done["phase_progress"] == 1.0
    assert done["layer_units"] == {layer["name"]: {"before": layer["units_before"],
                                                   "after": layer["units_after"]}
                                   for layer in layers}

    names = {a["name"] for a in api.artifacts(job["id"])}
    assert {"model.tar.gz", "masks.json", "metrics.json", "log.txt"} <= names
    model_dir = api.download_model(job["id"], tmp_path)  # follows S3's presigned 307 itself
    assert model_dir == tmp_path / "model"

    import mipp
    from mipp.artifacts import load_model_dir
    from mipp.data import load_npz
    from mipp.groups import count_params

    pruned = load_model_dir(model_dir)
    assert count_params(pruned) == metrics["params"]["after"]
    data = load_npz(digits_files["npz"])
    accuracy = mipp.evaluate(pruned, data.x_test, data.y_test, device="cpu")["accuracy"]
    # Same device: identical; GPU-reported vs CPU-evaluated may differ by one borderline sample.
    tolerance = 1e-6 if DEVICE == "cpu" else 1.5 / len(data.y_test)
    assert accuracy == pytest.approx(metrics["accuracy"]["retrained"], abs=tolerance)
    assert metrics["device"].startswith(DEVICE)
    masks = api.download(job["id"], "masks.json", tmp_path / "masks.json")
    assert set(json.loads(masks.read_text())) == {"fc1", "fc2", "fc3"}
    print(f"\n[{service.name}] end-to-end digits job: {wall:.1f} s wall")


def test_duplicate_delivery_runs_once(service, inputs):
    model_id, dataset_id = inputs
    job = service.submit("owner", model_id, dataset_id, QUICK_RANDOM)
    done = service.wait("owner", job["id"])
    assert done["status"] == "succeeded", done["error"]
    # The broker delivers the same job id again: the claim finds nothing and the task exits.
    service.app.state.queue.enqueue(job["id"], done["queue"], 60)
    marker = f"job {job['id']}: nothing to claim".encode()
    deadline = time.monotonic() + 60
    while marker not in service.worker_log.read_bytes():
        assert time.monotonic() < deadline, service.worker_log.read_text()[-3000:]
        time.sleep(0.2)
    again = service.job("owner", job["id"])
    assert again["attempt"] == 1 and again["status"] == "succeeded"
    assert again["finished_at"] == done["finished_at"]


def test_cancel_running_job_frees_worker(service, inputs):
    model_id, dataset_id = inputs
    job = service.submit("owner", model_id, dataset_id, LONG_RANDOM)
    service.wait("owner", job["id"], until=("running",), timeout=60)
    # Wait until the engine is inside its long retraining, then cancel.
    deadline = time.monotonic() + 60
    while service.job("owner", job["id"])["phase"] != "retraining":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.headers("owner"))
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    ended = service.wait("owner", job["id"], timeout=30)
    assert ended["status"] == "cancelled" and ended["error"] is None
    # The same worker takes the next job.
    follow = service.submit("owner", model_id, dataset_id, QUICK_RANDOM)
    assert service.wait("owner", follow["id"])["status"] == "succeeded"
    r = service.client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=service.headers("owner"))
    assert r.status_code == 409


def test_time_limit_fails_with_reason(service, inputs):
    model_id, dataset_id = inputs
    job = service.submit("owner", model_id, dataset_id, LONG_RANDOM, time_limit_s=4)
    ended = service.wait("owner", job["id"], timeout=60)
    assert ended["status"] == "failed"
    assert ended["error"].startswith("time limit") and "time_limit_s" in ended["error"]


def test_engine_error_is_an_actionable_failure(service, digits_files, tmp_path):
    import safetensors.torch
    import torch

    service.add_user("mismatch")
    # A 64-32-16 MLP's state_dict .pt declared as a 64-64 MLP. A safetensors file would be
    # refused at upload (its header is read there); a .pt's shapes are known only once the
    # worker loads it, and the engine names the mismatch.
    pt = tmp_path / "mlp.pt"
    torch.save(safetensors.torch.load_file(digits_files["weights"]), pt)
    model = service.upload_model("mismatch", pt, format="pt", config='{"widths": [64, 64]}')
    dataset = service.upload_dataset("mismatch", digits_files["npz"])
    job = service.submit("mismatch", model["id"], dataset["id"], QUICK_RANDOM)
    ended = service.wait("mismatch", job["id"])
    assert ended["status"] == "failed"
    assert "internal error" not in ended["error"] and "fc2" in ended["error"], ended["error"]
    api = service.api("mismatch")
    log = api.log(job["id"])  # the live copy, complete once the job ended
    assert "failed" in log and "fc2" in log
    stored = api.download(job["id"], "log.txt", tmp_path / "log.txt").read_text()
    assert stored.splitlines() == log.splitlines()  # and the artifact, line for line


def test_sweeper_requeues_a_job_whose_worker_died(service, inputs):
    from app.main import maintain_once
    from app.models import Job, utcnow

    model_id, dataset_id = inputs
    service.settings.queues = ("gpu-idle",)
    try:  # park a job where no worker listens, then make it look like a dead worker's
        job = service.submit("owner", model_id, dataset_id, QUICK_RANDOM, queue="gpu-idle")
    finally:
        service.settings.queues = ()
    stale = utcnow() - timedelta(seconds=service.settings.stale_heartbeat_s + 5)
    with service.app.state.sessionmaker() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(
            status="running", attempt=1, heartbeat_at=stale, started_at=stale,
            queue=service.settings.default_queue))
        session.commit()
    report = maintain_once(service.app)
    assert job["id"] in report.requeued and not report.ended
    done = service.wait("owner", job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 2
    # Out of attempts: the next stale run fails with a reason.
    with service.app.state.sessionmaker() as session:
        session.execute(update(Job).where(Job.id == job["id"]).values(
            status="running", attempt=service.settings.max_attempts, heartbeat_at=stale))
        session.commit()
    report = maintain_once(service.app)
    assert job["id"] in report.ended
    assert "stopped responding" in service.job("owner", job["id"])["error"]
