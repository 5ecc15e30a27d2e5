"""Sweeps without a worker: what a submission is refused for (before any row is written),
and the progress arithmetic the worker reports while a job runs."""

from __future__ import annotations

import pytest

from mipp.client import ServiceError


def _sweep_count(service) -> int:
    from sqlalchemy import func, select

    from app.models import Sweep

    with service.app.state.sessionmaker() as session:
        return session.scalar(select(func.count()).select_from(Sweep))


@pytest.mark.integration
def test_sweep_refusals_name_the_field_and_write_nothing(service, digits_files):
    service.add_user("planner")
    service.add_user("stranger")
    api = service.api("planner")
    model = service.upload_model("planner", digits_files["weights"])
    dataset = service.upload_dataset("planner", digits_files["npz"])
    before = service.row_counts(), _sweep_count(service)

    def refused(status: int, **body) -> str:
        with pytest.raises(ServiceError) as caught:
            api.submit_sweep(model["id"], dataset["id"], **body)
        assert caught.value.status == status, caught.value
        return caught.value.detail

    assert "exactly one of `targets`" in refused(422, targets=[0.5], tols=[0.1])
    assert "exactly one of `targets`" in refused(422)
    detail = refused(422, tols=[0.01, 0.1], methods=["mipp", "l1"])
    assert "tols" in detail and "l1" in detail
    detail = refused(422, targets=[0.5, 1.5])
    assert "1.5" in detail and "target" in detail
    # 3 targets x 7 methods = 21 jobs: above the 20 active jobs a user may have.
    detail = refused(429, targets=[0.3, 0.5, 0.7],
                     methods=["random", "l1", "taylor", "thinet", "snip", "grasp", "synflow"])
    assert "this submits 21" in detail and "limit 20" in detail
    with pytest.raises(ServiceError) as caught:  # another user's model answers like a missing one
        service.api("stranger").submit_sweep(model["id"], dataset["id"], targets=[0.5])
    assert caught.value.status == 404
    assert (service.row_counts(), _sweep_count(service)) == before
    with pytest.raises(ServiceError) as caught:
        api.sweep("0" * 32)
    assert caught.value.status == 404


def test_progress_covers_the_whole_job_and_never_goes_back():
    from worker.live import PHASE_ORDER, JobProgress, phase_weights

    for config in ({"target": 0.5}, {"method": "l1", "target": 0.5, "retrain": {"epochs": 0}},
                   {"tol": 0.1, "refit": False}):
        weights = phase_weights(config)
        assert set(weights) == set(PHASE_ORDER) and sum(weights.values()) == pytest.approx(1.0)
    now = [0.0]
    progress = JobProgress({"target": 0.5, "retrain": {"epochs": 2}}, clock=lambda: now[0])
    seen = []
    for phase in PHASE_ORDER:
        for fraction in (0.0, 0.5, 1.0):
            now[0] += 1.0
            seen.append(progress.update(phase, fraction))
    overall = [o for o, _ in seen]
    assert overall == sorted(overall) and overall[-1] == pytest.approx(1.0)
    # Refitting at 100% is not the end of the job: retraining and uploading are still ahead.
    refit_done = overall[PHASE_ORDER.index("refitting") * 3 + 2]
    assert refit_done < 0.9
    # A phase revisited (a baseline's own capture) does not move the bar back.
    assert progress.update("capturing", 0.0)[0] == pytest.approx(1.0)


def test_eta_once_it_can_be_estimated():
    from worker.live import JobProgress

    now = [100.0]
    progress = JobProgress({"target": 0.5}, clock=lambda: now[0])
    assert progress.update("selecting", 0.0)[1] is None
    now[0] += 0.5
    assert progress.update("selecting", 0.1)[1] is None  # under a second: too early to tell
    now[0] += 9.5
    _, eta = progress.update("selecting", 0.25)  # 10 s for a quarter: about 30 s to go
    assert eta == pytest.approx(30.0)
    assert progress.update("selecting", 1.0)[1] is None


@pytest.mark.integration
def test_a_sweep_is_its_owners_and_cancels_as_one(service, digits_files):
    service.add_user("owner-s")
    service.add_user("other-s")
    api, other = service.api("owner-s"), service.api("other-s")
    model = service.upload_model("owner-s", digits_files["weights"])
    dataset = service.upload_dataset("owner-s", digits_files["npz"])
    service.settings.queues = ("gpu-idle",)  # a queue no test worker consumes: jobs stay queued
    try:
        sweep = api.submit_sweep(model["id"], dataset["id"], tols=[0.01, 0.1], seeds=[0, 1],
                                 queue="gpu-idle", name="tols x seeds")
    finally:
        service.settings.queues = ()
    assert sweep["status"] == "queued" and sweep["counts"]["queued"] == 4
    assert sorted((r["tol"], r["seed"]) for r in sweep["rows"]) == [
        (0.01, 0), (0.01, 1), (0.1, 0), (0.1, 1)]
    assert all(r["method"] == "mipp" and r["target"] is None for r in sweep["rows"])
    for path in (f"/api/v1/sweeps/{sweep['id']}", f"/api/v1/sweeps/{sweep['id']}/plot.svg",
                 f"/api/v1/jobs/{sweep['rows'][0]['job_id']}/log"):
        r = service.client.get(path, headers=service.headers("other-s"))
        assert r.status_code == 404, (path, r.text)
    with pytest.raises(ServiceError) as caught:
        other.cancel_sweep(sweep["id"])
    assert caught.value.status == 404
    assert other.list_sweeps()["total"] == 0 and api.list_sweeps()["total"] == 1
    svg = service.client.get(sweep["plot_url"], headers=service.headers("owner-s"))
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert "no finished job yet" in svg.text
    assert api.log(sweep["rows"][0]["job_id"]) == ""  # a queued job has written nothing yet

    cancelled = api.cancel_sweep(sweep["id"])
    assert cancelled["status"] == "cancelled" and cancelled["counts"]["cancelled"] == 4
