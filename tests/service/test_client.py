"""The client (mipp.client and the `mipp` commands) against a real server and real workers:
the whole journey, log following while a job runs, a sweep with its plot; and a client that
works where torch cannot be imported."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("MIPP_TEST_DEVICE", "cpu")
# A target search on a tiny MLP: every sweep of the search shows in the progress and the log.
SEARCH = {
    "target": 0.5,
    "calibration_samples": 512,
    "repeats": 2,
    "reconstructor": {"epochs": 5, "finetune_epochs": 2, "ordering_epochs": 2},
    "retrain": {"epochs": 2, "batch_size": 128},
    "device": DEVICE,
}
LONG_RANDOM = {"method": "random", "target": 0.5, "retrain": {"epochs": 5000, "batch_size": 16},
               "device": DEVICE}


def _child_env() -> dict[str, str]:
    """This checkout first on the child's path."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


BLOCK_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def test_client_and_commands_need_no_torch(tmp_path):
    """`import mipp.client`, the parser and a client command run with torch unimportable."""
    script = BLOCK_TORCH + textwrap.dedent(f"""
        import os
        import mipp.client, mipp.cli
        parser = mipp.cli.build_parser()
        for argv in (["jobs", "--help"], ["sweeps", "submit", "--help"], ["login", "--help"]):
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                assert exc.code == 0, argv
        os.environ["MIPP_URL"] = "http://127.0.0.1:9"   # nothing listens: a clear error, exit 2
        os.environ["MIPP_API_KEY"] = "mipp_x"
        code = mipp.cli.main(["jobs", "list"])
        assert code == 2, code
        os.environ.pop("MIPP_URL"); os.environ.pop("MIPP_API_KEY")
        os.environ["MIPP_CONFIG"] = {str(tmp_path / "none.json")!r}
        assert mipp.cli.main(["jobs", "show", "abc"]) == 2
        print("TORCH", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH []" in proc.stdout
    assert "cannot reach the service at http://127.0.0.1:9" in proc.stderr
    assert "no server configured: run `mipp login" in proc.stderr


def test_login_file_is_private(tmp_path, monkeypatch):
    from mipp.client import load_login, save_login

    path = tmp_path / "cfg" / "client.json"
    path.parent.mkdir()
    path.write_text("{}")
    os.chmod(path, 0o644)  # an old, too-open file is tightened when rewritten
    save_login("http://x:8000", "mipp_secret", path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_login(path) == {"url": "http://x:8000", "api_key": "mipp_secret"}




def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    from mipp.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
@pytest.mark.slow
def test_journey_through_the_cli(team_service, digits_files, tmp_path, monkeypatch, capsys):
    """login -> upload -> submit -> watch -> show -> logs -> download and load, all `mipp ...`."""
    service = team_service
    service.add_user("cli")
    config_file = tmp_path / "home" / "client.json"
    monkeypatch.setenv("MIPP_CONFIG", str(config_file))
    monkeypatch.delenv("MIPP_URL", raising=False)
    monkeypatch.setenv("MIPP_API_KEY", service.users["cli"])
    code, out, err = _run_cli(capsys, "login", service.url)
    assert code == 0, err
    assert "logged in" in out and stat.S_IMODE(config_file.stat().st_mode) == 0o600
    monkeypatch.delenv("MIPP_API_KEY")  # from here on, the saved login is all there is

    code, out, err = _run_cli(capsys, "models", "upload", str(digits_files["weights"]), "--arch", "mlp",
                              "--config", '{"widths": [64, 32, 16]}', "--input-shape", "[64]",
                              "--num-classes", "10", "--json")
    assert code == 0, err
    model_id = json.loads(out)["id"]
    code, out, err = _run_cli(capsys, "datasets", "upload", str(digits_files["npz"]), "--json")
    assert code == 0, err
    dataset_id = json.loads(out)["id"]

    code, out, err = _run_cli(capsys, "jobs", "submit", "--model", model_id, "--dataset", dataset_id,
                              "--config", json.dumps(SEARCH))
    assert code == 0, err
    job_id = out.strip()
    code, out, err = _run_cli(capsys, "jobs", "watch", job_id, "--poll", "0.2")
    assert code == 0, err + out
    assert "succeeded" in out and "units per layer" in out
    assert "selecting" in err  # the bar showed the search's phase

    code, out, err = _run_cli(capsys, "jobs", "show", job_id, "--json")
    job = json.loads(out)
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert 0 < job["tol"] <= 0.05  # the tol the search chose is a field of its own
    assert list(job["layer_units"]) == ["fc1", "fc2", "fc3"]
    assert [u["before"] for u in job["layer_units"].values()] == [64, 32, 16]
    kept = sum(u["after"] for u in job["layer_units"].values())
    assert job["metrics"]["units"]["after"] == kept
    assert [layer["details"]["tol"] for layer in job["layers"]] == [job["tol"]] * 3

    code, out, err = _run_cli(capsys, "jobs", "logs", job_id)
    assert code == 0, err
    log = out.splitlines()
    assert len(log) >= 15, out
    assert any("sweep 1/" in line and "tol=" in line for line in log), out
    assert any("removed" in line and "fc1" in line for line in log), out
    assert any("accuracy" in line and "retrained" in line for line in log), out

    out_dir = tmp_path / "pruned"
    code, out, err = _run_cli(capsys, "jobs", "download", job_id, "--out", str(out_dir), "--load")
    assert code == 0, err
    assert f"{job['metrics']['params']['after']:,} parameters" in out
    code, out, err = _run_cli(capsys, "jobs", "download", job_id, "log.txt", "metrics.json",
                              "--out", str(out_dir))
    assert code == 0, err
    assert json.loads((out_dir / "metrics.json").read_text())["units"] == job["metrics"]["units"]
    assert (out_dir / "log.txt").read_text().count("\n") >= len(log) - 1

    import mipp
    from mipp.data import load_npz

    model = mipp.load_model_dir(out_dir / "model")
    data = load_npz(digits_files["npz"])
    accuracy = mipp.evaluate(model, data.x_test, data.y_test, device="cpu")["accuracy"]
    tolerance = 1e-6 if DEVICE == "cpu" else 1.5 / len(data.y_test)
    assert accuracy == pytest.approx(job["metrics"]["accuracy"]["retrained"], abs=tolerance)

    code, out, err = _run_cli(capsys, "jobs", "list", "--model", model_id)
    assert code == 0 and job_id in out


@pytest.mark.integration
@pytest.mark.slow
def test_follow_the_log_while_the_job_runs(team_service, digits_files):
    from mipp.client import Client

    service = team_service
    service.add_user("follower")
    api = Client(service.url, service.users["follower"])
    model = api.upload_model(digits_files["weights"], arch="mlp", config={"widths": [64, 32, 16]})
    dataset = api.upload_dataset(digits_files["npz"])
    job = api.submit_job(model["id"], dataset["id"], LONG_RANDOM)

    received: list[tuple[float, str]] = []
    ended = threading.Event()

    def follow():
        for line in api.follow_log(job["id"]):
            received.append((time.monotonic(), line))
        ended.set()

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    deadline = time.monotonic() + 90
    while not any("retraining" in line for _, line in received):
        assert time.monotonic() < deadline, received
        assert not ended.is_set(), received
        time.sleep(0.1)
    running = api.job(job["id"])
    assert running["status"] == "running"  # lines arrived while the job was still running
    assert running["phase"] == "retraining" and 0 < running["progress"] < 1
    assert not ended.is_set()
    api.cancel(job["id"])
    assert ended.wait(60), "the stream did not end with the job"
    final = api.job(job["id"])
    assert final["status"] == "cancelled"
    lines = [line for _, line in received]
    assert any("cancelled" in line for line in lines[-5:]), lines[-10:]
    # The whole log is also kept as an artifact, with the same lines.
    stored = api.download(job["id"], "log.txt", service.settings.tmp_dir / f"{job['id']}.txt")
    assert stored.read_text().splitlines() == lines
    api.close()


@pytest.mark.integration
@pytest.mark.slow
def test_sweep_of_three_targets_with_its_plot(team_service, digits_files, tmp_path, capsys,
                                              monkeypatch):
    service = team_service
    service.add_user("sweeper")
    api = service.api("sweeper")
    model = service.upload_model("sweeper", digits_files["weights"])
    dataset = service.upload_dataset("sweeper", digits_files["npz"])
    targets = [0.25, 0.5, 0.75]
    sweep = api.submit_sweep(model["id"], dataset["id"], targets=targets, methods=["l1", "random"],
                             config={"retrain": {"epochs": 1}, "device": DEVICE})
    assert len(sweep["rows"]) == 6 and sweep["status"] in ("queued", "running")
    done = api.wait_sweep(sweep["id"], poll_s=0.3, timeout_s=240)
    assert done["status"] == "succeeded", done["rows"]
    rows = {(r["method"], r["target"]): r for r in done["rows"]}
    assert set(rows) == {(m, t) for m in ("l1", "random") for t in targets}
    for method in ("l1", "random"):
        removed = [rows[(method, t)]["units_removed_fraction"] for t in targets]
        params = [rows[(method, t)]["params_after"] for t in targets]
        assert removed == sorted(removed) and params == sorted(params, reverse=True)
        for t in targets:
            assert abs(rows[(method, t)]["units_removed_fraction"] - t) < 0.05
            assert rows[(method, t)]["accuracy_retrained"] is not None
    # The jobs are ordinary jobs, listed under their sweep.
    listed = api.list_jobs(sweep_id=sweep["id"])
    assert listed["total"] == 6

    svg = api.sweep_plot(sweep["id"], tmp_path / "sweep.svg").read_text()
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    lines = root.findall(f".//{ns}polyline")
    assert len(lines) == 3 * 2 * 3  # 3 panels x 2 methods x 3 accuracies (pruned/refit/retrained)
    assert all(len(line.get("points").split()) == 3 for line in lines)  # one point per target
    labels = {t.text for t in root.iter(f"{ns}text")}
    assert {"units removed (%)", "parameters (pruned)", "MACs (pruned)", "l1", "random"} <= labels

    monkeypatch.setenv("MIPP_URL", service.url)
    monkeypatch.setenv("MIPP_API_KEY", service.users["sweeper"])
    code, out, err = _run_cli(capsys, "sweeps", "show", sweep["id"], "--plot", str(tmp_path / "cli.svg"))
    assert code == 0, err
    assert out.count("succeeded") >= 7 and (tmp_path / "cli.svg").read_text() == svg
