"""The web dashboard (/ui) in a real browser, and the API docs (/docs) served offline.

Debian's chromium (headless), driven by Playwright's Python package with that executable
(`playwright install` is never needed), against the embedded setup's real API and worker. The
browser reaches the API as http://mipp.test:PORT (mapped to 127.0.0.1 inside chromium, so the
page is not on localhost, where some pages behave differently) and every request to any other
host is aborted and recorded: the server has no internet, and the page must not need it.
Screenshots go to test-artifacts/dashboard/ (gitignored).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
import tomllib
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DEVICE = os.environ.get("MIPP_TEST_DEVICE", "cpu")
CHROMIUM = os.environ.get("MIPP_TEST_CHROMIUM", "/usr/bin/chromium")
HOST = "mipp.test"
LOAD_FAILED = "Failed to load resource: the server responded with a status of"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
]
# A small MIPP job: a few seconds on CPU, long enough for the page to poll it while it runs.
# (Workers fork from a parent that has torch loaded, so a job starts at once: the selection and
# the retraining must carry the few seconds themselves.)
QUICK = {"calibration_samples": 1024, "repeats": 3,
         "reconstructor": {"epochs": 20, "finetune_epochs": 6, "ordering_epochs": 4},
         "retrain": {"epochs": 40, "batch_size": 64}, "device": DEVICE}


def _need(what: str) -> None:
    message = f"{what} is not installed (`make install` installs it)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true: the dashboard test must not be skipped")
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need("playwright (the test extra)")
    if not os.access(CHROMIUM, os.X_OK):
        _need(f"chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def shots():
    """A fresh folder per run for this module's screenshots."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


class Offline:
    """A browser context where every request is recorded and any request to a host other
    than the API's is aborted (as it would fail on a server without internet)."""

    def __init__(self, browser, origin: str):
        self.origin = urlsplit(origin).netloc
        self.urls: list[str] = []
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.plots: list[bytes] = []  # the sweep plots the page was sent, in order
        self.context = browser.new_context(accept_downloads=True,
                                           viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(30_000)
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))

    def _route(self, route):
        url = route.request.url
        self.urls.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.netloc != self.origin:
            self.blocked.append(url)
            return route.abort()
        if parts.path.endswith("/plot.svg"):
            # Fetched by Playwright itself, which does not know chromium's host mapping.
            response = route.fetch(url=url.replace(f"//{HOST}:", "//127.0.0.1:", 1))
            self.plots.append(response.body())
            return route.fulfill(response=response)
        return route.continue_()

    def close(self):
        self.context.close()


@contextmanager
def api_log_output():
    """Everything the API process logs (uvicorn's access log included, switched on for the
    test: without it a key in a URL would go unseen) as text."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "mipp", "mipp.api"]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(handler)
            logging.getLogger(name).setLevel(saved[name])


def _stored_bytes(service, job_id: str, name: str) -> bytes:
    from sqlalchemy import select

    from app.models import Artifact

    with service.app.state.sessionmaker() as session:
        key = session.scalars(select(Artifact.store_key).where(
            Artifact.job_id == job_id, Artifact.name == name)).one()
    body = service.app.state.store.open_stream(key)  # a file, or S3's streaming body
    try:
        return body.read()
    finally:
        body.close()


def _watch(page, seen: list, until: set[str], timeout: float, shot: Path | None = None) -> str:
    """Sample the job page's status badge and progress bar until the status is in `until`."""
    deadline = time.monotonic() + timeout
    while True:
        status = page.get_attribute("#view .title-line [data-status]", "data-status")
        progress = float(page.get_attribute("#job-progress", "data-progress") or 0)
        log_lines = page.locator("#job-log").text_content().count("\n")
        seen.append((status, progress, log_lines))
        if shot is not None and status == "running" and 0 < progress < 1:
            page.screenshot(path=shot, full_page=True)
            shot = None
        if status in until:
            return status
        assert time.monotonic() < deadline, f"job still {status} after {timeout} s: {seen[-5:]}"
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.slow
def test_dashboard_journey(embedded_service, digits_files, browser, shots):
    """sign in -> upload a model and a dataset -> submit -> watch (progress, live log) ->
    results (chart, MI figures, before/after) -> download -> cancel a second job -> a sweep
    with its plot; the key never in a URL nor in the API's log."""
    from playwright.sync_api import expect

    service = embedded_service
    service.add_user("web")
    key = service.users["web"]
    api = service.api("web")
    base = service.url.replace("127.0.0.1", HOST)
    with api_log_output() as api_log:
        browser_ = Offline(browser, base)
        page = browser_.page
        try:
            # A browser asking for / lands on the dashboard's sign-in.
            page.goto(base + "/")
            assert urlsplit(page.url).path == "/ui/"
            expect(page.locator("#signin")).to_be_visible()
            page.fill("#api-key", "mipp_not-a-key")
            page.click("#signin-form button[type=submit]")
            expect(page.locator("#error")).to_contain_text("invalid or revoked API key")
            page.fill("#api-key", key)
            page.screenshot(path=shots / "01-sign-in.png")
            page.click("#signin-form button[type=submit]")
            expect(page.locator("#who")).to_contain_text("signed in as web-")
            # The key is kept for this tab only.
            assert page.evaluate("sessionStorage.getItem('mipp.apiKey')") == key
            assert page.evaluate("localStorage.length") == 0

            # Upload a model: multipart, as POST /models takes it.
            page.click("#nav >> text=Models")
            page.set_input_files("#model-form input[name=file]", str(digits_files["weights"]))
            page.select_option("#model-form select[name=arch]", "mlp")
            page.fill("#model-form input[name=config]", '{"widths": [64, 32, 16]}')
            page.fill("#model-form input[name=input_shape]", "[64]")
            page.fill("#model-form input[name=num_classes]", "10")
            page.fill("#model-form input[name=name]", "digits mlp")
            page.click("#model-form button[type=submit]")
            expect(page.locator("#models-table tr[data-model]")).to_have_count(1)
            expect(page.locator("#models-table tr[data-model]")).to_contain_text("digits mlp")
            # A refused upload shows the API's message (naming the field) in the banner.
            page.set_input_files("#model-form input[name=file]", str(digits_files["weights"]))
            page.select_option("#model-form select[name=arch]", "mlp")
            page.fill("#model-form input[name=config]", '{"widths": [64, 32, 16]}')
            page.fill("#model-form input[name=input_shape]", "[65]")
            page.fill("#model-form input[name=num_classes]", "10")
            page.click("#model-form button[type=submit]")
            expect(page.locator("#error")).to_be_visible()
            assert "fc1.weight" in page.locator("#error").text_content()
            expect(page.locator("#models-table tr[data-model]")).to_have_count(1)
            page.screenshot(path=shots / "02-models.png", full_page=True)
            [model] = api.list_models()["items"]
            assert (model["name"], model["arch"], model["input_shape"], model["num_classes"]) == \
                ("digits mlp", "mlp", [64], 10)
            assert model["sha256"] == _sha256(digits_files["weights"])

            page.click("#nav >> text=Datasets")
            page.set_input_files("#dataset-form input[name=file]", str(digits_files["npz"]))
            page.click("#dataset-form button[type=submit]")
            expect(page.locator("#datasets-table tr[data-dataset]")).to_have_count(1)
            expect(page.locator("#datasets-table tr[data-dataset]")).to_contain_text("1,400")
            page.screenshot(path=shots / "03-datasets.png", full_page=True)
            [dataset] = api.list_datasets()["items"]
            assert dataset["sha256"] == _sha256(digits_files["npz"])

            # Submit a job from the jobs page; the page moves to the job.
            page.click("#nav >> text=Jobs")
            page.fill("#job-form input[name=tol]", "0.05")
            page.fill("#job-form input[name=epochs]", "40")
            page.fill("#job-form input[name=device]", DEVICE)
            page.fill("#job-form textarea[name=extra]", json.dumps(QUICK))
            page.click("#job-form button[type=submit]")
            page.wait_for_url(re.compile(r"#/jobs/[0-9a-f]{32}$"))
            job_id = page.url.rsplit("/", 1)[1]
            seen: list = []
            status = _watch(page, seen, {"succeeded", "failed", "cancelled"}, 180,
                            shot=shots / "04-job-running.png")
            assert status == "succeeded", (seen[-5:], api.job(job_id)["error"])
            # The progress moved on the page while the job ran, and ended at 1.
            running = [p for s, p, _ in seen if s == "running"]
            assert any(0 < p < 1 for p in running), seen
            assert seen[-1][1] == 1.0
            assert running == sorted(running)  # never backwards
            job = api.job(job_id)
            assert job["status"] == "succeeded" and job["model_id"] == model["id"]
            assert job["config"]["tol"] == 0.05 and job["config"]["retrain"]["epochs"] == 40

            # Results: units per layer as a chart, MI figures, before/after.
            bars = page.locator("#units-chart g[data-layer]")
            expect(bars).to_have_count(len(job["layer_units"]))
            for name, units in job["layer_units"].items():
                bar = page.locator(f"#units-chart g[data-layer='{name}']")
                expect(bar).to_contain_text(f"{units['before']} → {units['after']}")
                before = float(bar.locator("rect.before").get_attribute("width"))
                after = float(bar.locator("rect.after").get_attribute("width"))
                assert after == pytest.approx(before * units["after"] / units["before"], rel=1e-6)
            layers = api.layers(job_id)
            mi = layers[0]["details"]["mi_estimate"]
            expect(page.locator("#mi-table")).to_contain_text("mi estimate")
            expect(page.locator("#mi-table tbody tr").first).to_contain_text(f"{mi:.4g}")
            m = job["metrics"]
            table = page.locator("#metrics-table")
            acc = m["accuracy"]
            for text in (f"{100 * acc['dense']:.1f}%", f"{100 * acc['retrained']:.1f}%",
                         f"{m['params']['before']:,}", f"{m['params']['after']:,}",
                         f"{m['macs']['before']:,}", f"{m['macs']['after']:,}",
                         f"{m['latency_ms']['after']:.3f} ms"):
                expect(table).to_contain_text(text)
            # The live log ended with the job, holding every line the API has.
            full_log = api.log(job_id)
            expect(page.locator("#job-log")).to_have_text(full_log.rstrip("\n"), timeout=10_000)
            assert full_log.count("\n") >= 10
            page.screenshot(path=shots / "05-job-succeeded.png", full_page=True)
            page.screenshot(path=shots / "dashboard-job.png")  # the one docs/service.md shows

            # Download: fetched with the key in a header, saved from a blob.
            with page.expect_download() as info:
                page.click("#artifacts tr[data-artifact='model.tar.gz'] button")
            download = info.value
            assert download.suggested_filename == "model.tar.gz"
            stored = _stored_bytes(service, job_id, "model.tar.gz")
            assert Path(download.path()).read_bytes() == stored
            assert download.url.startswith("blob:")

            # The jobs list shows it, finished.
            page.click("#nav >> text=Jobs")
            row = page.locator(f"#jobs-table tr[data-job='{job_id}']")
            expect(row.locator("[data-status]")).to_have_text("succeeded")
            expect(row).to_contain_text("digits mlp")

            # A long job: its log is followed while it runs, then Cancel stops it.
            long_job = api.submit_job(model["id"], dataset["id"],
                                      {"method": "random", "target": 0.5, "device": DEVICE,
                                       "retrain": {"epochs": 5000, "batch_size": 16}})
            expect(row.locator("[data-status]")).to_have_text("succeeded")
            long_row = page.locator(f"#jobs-table tr[data-job='{long_job['id']}']")
            expect(long_row).to_be_visible()  # the list polls: a job from elsewhere appears
            page.screenshot(path=shots / "06-jobs.png", full_page=True)
            long_row.locator("a").click()
            expect(page.locator("#job-log")).to_contain_text("retraining", timeout=60_000)
            expect(page.locator("#view .title-line [data-status]")).to_have_text("running")
            page.click("#cancel-job")
            seen = []
            assert _watch(page, seen, {"cancelled", "succeeded", "failed"}, 60) == "cancelled"
            assert api.job(long_job["id"])["status"] == "cancelled"
            expect(page.locator("#cancel-job")).to_be_hidden()

            # A sweep from the sweeps page: two targets, its table and its plot.
            page.click("#nav >> text=Sweeps")
            page.uncheck("#sweep-form input[value=mipp]")
            page.check("#sweep-form input[value=random]")
            page.fill("#sweep-form input[name=targets]", "0.25, 0.5")
            page.fill("#sweep-form textarea[name=extra]",
                      json.dumps({"retrain": {"epochs": 1}, "device": DEVICE}))
            page.click("#sweep-form button[type=submit]")
            page.wait_for_url(re.compile(r"#/sweeps/[0-9a-f]{32}$"))
            sweep_id = page.url.rsplit("/", 1)[1]
            expect(page.locator("#view .title-line [data-status]")).to_have_text("succeeded",
                                                                                 timeout=120_000)
            expect(page.locator("#sweep-rows tbody tr")).to_have_count(2)
            sweep = api.sweep(sweep_id)
            assert sweep["status"] == "succeeded" and len(sweep["rows"]) == 2
            # The plot shown is the API's final one (fetched again once the jobs ended, before
            # the status is painted).
            page.wait_for_function("document.getElementById('sweep-plot').naturalWidth > 0")
            stored_plot = service.client.get(f"/api/v1/sweeps/{sweep_id}/plot.svg",
                                             headers=service.headers("web")).content
            assert browser_.plots[-1] == stored_plot and b"<polyline" in stored_plot
            page.screenshot(path=shots / "07-sweep.png", full_page=True)

            # Sign out: the key leaves the tab.
            page.click("#signout")
            expect(page.locator("#signin")).to_be_visible()
            assert page.evaluate("sessionStorage.getItem('mipp.apiKey')") is None
        finally:
            browser_.close()

    # The console shows the two refusals this test provoked, and nothing else.
    assert browser_.errors == [f"{LOAD_FAILED} 401 (Unauthorized)",
                               f"{LOAD_FAILED} 422 (Unprocessable Entity)"], browser_.errors
    assert not browser_.blocked, f"the page asked other hosts: {browser_.blocked}"
    api_urls = [u for u in browser_.urls if "/api/v1/" in u]
    assert len(api_urls) > 20, browser_.urls  # the page did talk to the API
    assert not [u for u in browser_.urls if key in u], "the API key appeared in a URL"
    assert f"/api/v1/jobs/{job_id}/artifacts/model.tar.gz?redirect=false" in " ".join(browser_.urls)
    output = api_log.getvalue()
    assert f"/api/v1/jobs/{job_id}/artifacts/model.tar.gz" in output  # the access log was seen
    assert key not in output, "the API key appeared in the API's log"
    assert key not in service.worker_log.read_text(errors="replace")


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.integration
@pytest.mark.slow
def test_download_through_the_api_where_the_store_presigns(team_service, digits_files):
    """The team setup here presigns S3 downloads (a 307 to the store, another host); the
    dashboard asks redirect=false and gets the bytes from the API itself."""
    service = team_service
    service.add_user("web-s3")
    api = service.api("web-s3")
    model = service.upload_model("web-s3", digits_files["weights"])
    dataset = service.upload_dataset("web-s3", digits_files["npz"])
    job = api.submit_job(model["id"], dataset["id"], {"method": "random", "target": 0.5,
                                                      "retrain": {"epochs": 1}, "device": DEVICE})
    assert service.wait("web-s3", job["id"])["status"] == "succeeded"
    path = f"/api/v1/jobs/{job['id']}/artifacts/model.tar.gz"
    headers = service.headers("web-s3")
    redirected = service.client.get(path, headers=headers, follow_redirects=False)
    assert redirected.status_code == 307 and "X-Amz-Signature" in redirected.headers["location"]
    direct = service.client.get(path + "?redirect=false", headers=headers, follow_redirects=False)
    assert direct.status_code == 200
    assert direct.content == _stored_bytes(service, job["id"], "model.tar.gz")
    assert direct.headers["content-type"] == "application/gzip"


# ------------------------------------------------------------------------------------------
# /docs without a CDN

ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*'([^']+)'""")


@pytest.mark.integration
def test_docs_reference_no_other_host_and_their_assets_load(embedded_service):
    client = embedded_service.client
    r = client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html and "https://" not in html, html
    assert '"validatorUrl": null' in html  # else Swagger UI shows a badge from validator.swagger.io
    urls = {m.group(1) or m.group(2) for m in ASSET.finditer(html)}
    assert {Path(urlsplit(u).path).name for u in urls} == {
        "swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"}, urls
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        if url.endswith(".js"):
            assert asset.headers["content-type"].startswith(("text/javascript",
                                                             "application/javascript"))
            assert len(asset.content) > 100_000  # the real bundle, not a stub
        if url.endswith(".css"):
            assert asset.headers["content-type"].startswith("text/css")
    # ReDoc is not served: its bundle always fetches its logo from cdn.redoc.ly.
    assert client.get("/redoc").status_code == 404
    # The Swagger UI shipped can read this API's OpenAPI 3.1 (Swagger UI 4 cannot).
    bundle = client.get("/docs-assets/swagger-ui-bundle.js").text
    assert re.search(r'PACKAGE_VERSION:"5\.\d+\.\d+"', bundle)
    assert client.get("/openapi.json").json()["openapi"].startswith("3.1")


@pytest.mark.integration
def test_docs_render_offline_in_a_browser(embedded_service, browser, shots):
    from playwright.sync_api import expect

    base = embedded_service.url.replace("127.0.0.1", HOST)
    browser_ = Offline(browser, base)
    page = browser_.page
    try:
        page.goto(base + "/docs")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("mipp pruning service")
        expect(page.locator(".opblock").first).to_be_visible()
        assert page.locator(".opblock").count() >= 15  # every route of the API is listed
        expect(page.locator(".swagger-ui .btn.authorize")).to_be_visible()  # the bearer key
        page.locator(".opblock").first.click()  # an operation opens, fully drawn offline
        expect(page.locator(".opblock-body").first).to_be_visible()
        page.screenshot(path=shots / "docs.png")
    finally:
        browser_.close()
    assert not browser_.blocked, f"the docs asked other hosts: {browser_.blocked}"
    assert not browser_.errors, browser_.errors


@pytest.mark.integration
def test_root_and_dashboard_answers(embedded_service):
    client = embedded_service.client
    # API clients asking / get the index; browsers are sent to the dashboard.
    assert client.get("/").json()["dashboard"] == "/ui/"
    r = client.get("/", headers={"Accept": "text/html,application/xhtml+xml"},
                   follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    r = client.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    page = client.get("/ui/")
    assert page.status_code == 200 and "app.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    assert set(client.get("/ui/config.json").json()) == {
        "architectures", "methods", "builtin_datasets", "model_formats"}
    for name in ("", "app.js", "style.css"):
        asset = client.get(f"/ui/{name}")
        assert asset.status_code == 200
        # No URL of another host (the SVG namespace is a name, never fetched).
        assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+", asset.text.replace(SVG_NS, "")), name


SVG_NS = "http://www.w3.org/2000/svg"


def test_dashboard_files_are_package_data():
    """Every file under app/web/static matches a package-data glob, so a wheel ships it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = project["tool"]["setuptools"]["package-data"]["app"]
    static = REPO / "app" / "web" / "static"
    files = [p.relative_to(REPO / "app").as_posix() for p in static.rglob("*") if p.is_file()]
    assert files and all(any(fnmatch(f, g) for g in globs) for f in files), (files, globs)
    deps = " ".join(project["project"]["optional-dependencies"]["service"])
    assert "fastapi-offline" in deps  # /docs' assets
    test_extra = project["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("playwright") for d in test_extra)
