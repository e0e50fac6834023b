"""`lorafit ui` in a real browser (Playwright driving Debian's chromium) on the real embedded
model: the whole job from a glossary with a broken row to a downloadable GGUF; and the app's
guards against a hostile page or client."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import DATA

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_browser = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="Debian's chromium is not installed: apt-get install -y chromium (.ci/run does)",
)
SHOTS = (
    Path(os.environ.get("LORAFIT_UI_SCREENSHOTS", ""))
    if os.environ.get("LORAFIT_UI_SCREENSHOTS")
    else None
)
BROKEN = (
    (DATA / "brewing.yaml")
    .read_text()
    .replace(
        "  - term: Lautering\n    definition: Separating the sweet wort from the spent grain after mashing.\n",
        "  - term: Lautering\n",
    )
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workspace: Path, *extra: str):
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorafit",
            "ui",
            "--workspace",
            str(workspace),
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # the workspace's own store (runs/mlflow.db), as a user gets it, not the session's one
        # that every other test's runs went to
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            urllib.request.urlopen(base + "/static/app.css", timeout=2)
            return proc, base
        except urllib.error.HTTPError:  # it answers (a token may be needed)
            return proc, base
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("lorafit ui did not come up")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _kill_jobs(workspace: Path) -> None:
    """The app's jobs outlive it by design (a page re-attaches); a failed test must not leave
    a training running."""
    from lorafit.ui.workspace import Workspace

    for job in Workspace(workspace).running():
        os.kill(job.pid, signal.SIGKILL)


def _status(url, data=None, headers=None) -> int:
    request = urllib.request.Request(url, data, headers or {})
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


# --- the guards --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from lorafit.ui.app import build_app

    workspace = tmp_path_factory.mktemp("ui-guards")
    client = TestClient(build_app(workspace, token=None, hosts={"testserver", "localhost"}))
    csrf = re.search(r'csrf-token" content="([^"]+)"', client.get("/").text).group(1)
    return client, csrf, workspace


def test_cross_site_posts_are_refused(app_client):
    client, csrf, workspace = app_client
    body = (DATA / "brewing.yaml").read_bytes()
    raw = {"Content-Type": "application/octet-stream"}
    assert (
        client.post("/api/glossary/upload?name=g.yaml", content=body, headers=raw).status_code
        == 403
    )
    form = {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf}
    assert client.post("/api/glossary/paste", content=b"name=x", headers=form).status_code == 415
    wrong = {**raw, "X-CSRF-Token": "guessed"}
    assert (
        client.post("/api/glossary/upload?name=g.yaml", content=body, headers=wrong).status_code
        == 403
    )
    assert not list((workspace / "glossaries").iterdir())  # nothing written
    ok = {**raw, "X-CSRF-Token": csrf}
    assert (
        client.post("/api/glossary/upload?name=g.yaml", content=body, headers=ok).status_code == 200
    )


def test_dns_rebinding_is_refused(app_client):
    client, _, _ = app_client
    assert client.get("/", headers={"Host": "evil.example"}).status_code == 403
    assert client.get("/runs", headers={"Host": "evil.example:7860"}).status_code == 403


def test_uploads_are_limited_and_parsed_before_they_touch_disk(app_client):
    client, csrf, workspace = app_client
    headers = {"Content-Type": "application/octet-stream", "X-CSRF-Token": csrf}
    big = b"terms:\n" + b"  - term: x\n    definition: " + b"y" * 2_100_000 + b"\n"
    assert (
        client.post("/api/glossary/upload?name=big.yaml", content=big, headers=headers).status_code
        == 413
    )
    garbage = b"\x00\x01 not: [a glossary"
    r = client.post("/api/glossary/upload?name=bad.yaml", content=garbage, headers=headers)
    assert r.status_code == 400 and r.json()["error"]
    assert sorted(p.name for p in (workspace / "glossaries").iterdir()) in ([], ["g.yaml"])


def test_paths_stay_inside_the_workspace(app_client, tmp_path):
    client, csrf, workspace = app_client
    headers = {"Content-Type": "application/octet-stream", "X-CSRF-Token": csrf}
    body = (DATA / "brewing.yaml").read_bytes()
    for name in ("../evil.yaml", "..%2Fevil.yaml", "/etc/evil.yaml", "sub/evil.yaml"):
        r = client.post(f"/api/glossary/upload?name={name}", content=body, headers=headers)
        assert r.status_code == 400, name
    assert not (workspace.parent / "evil.yaml").exists()
    (tmp_path / "secret.txt").write_text("SECRET-CONTENT-42")
    (workspace / "exports" / "link").symlink_to(tmp_path / "secret.txt")
    for path in ("/files/..%2F..%2Fetc%2Fpasswd", "/files/exports/link", "/files/%2Fetc%2Fpasswd"):
        r = client.get(path)
        assert r.status_code in (400, 404) and "SECRET-CONTENT-42" not in r.text, path
    json_headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf}
    r = client.post(
        "/api/train/start",
        content=json.dumps({"run": "../x", "glossary": "g.yaml"}),
        headers=json_headers,
    )
    assert r.status_code == 400


def test_a_run_that_is_still_starting_has_pages(app_client):
    """The Train page opens right after Start, before the training process wrote run.json:
    it says "starting" (it once answered 500 there and the chart never appeared)."""
    client, csrf, workspace = app_client
    (workspace / "runs" / "fresh").mkdir(parents=True, exist_ok=True)
    r = client.get("/train?run=fresh")
    assert r.status_code == 200 and 'id="status">starting<' in r.text
    json_headers = {"Content-Type": "application/json", "X-CSRF-Token": csrf}
    r = client.post("/api/eval/start", content=json.dumps({"run": "fresh"}), headers=json_headers)
    assert r.status_code == 400 and "has not started yet" in r.text


def test_a_training_that_dies_before_it_begins_says_so(app_client):
    """A training process that ends before writing run.json (here: its config is missing)
    shows "failed" with the reason and its log, not "starting" for good."""
    client, _, workspace = app_client
    from lorafit.ui.workspace import Workspace

    ws = Workspace(workspace)
    ws.start("train", "doomed", ["train", "configs/missing.yaml", "--output", "runs/doomed"])
    deadline = time.time() + 120
    while time.time() < deadline:  # the page's own event stream, as a browser polls it
        with client.stream("GET", "/api/train/events?run=doomed") as events:
            first = next(line for line in events.iter_lines() if line.startswith("data: "))
        state = json.loads(first[len("data: ") :])
        if not state["running"]:
            break
        time.sleep(0.5)
    assert not (workspace / "runs" / "doomed" / "run.json").exists()
    assert state["status"] == "failed" and not state["running"]
    assert "ended before it began (exit code 2)" in state["error"]
    assert "missing.yaml" in state["log"]  # the reason, in the log the page opens
    assert 'id="status">failed<' in client.get("/train?run=doomed").text


def test_off_loopback_a_token_is_required(tmp_path):
    proc, base = _start(tmp_path, "--host", "0.0.0.0", "--token", "t0ken-for-test")
    try:
        assert _status(base + "/") == 401
        assert _status(base + "/?token=wrong") == 401
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
        assert (
            opener.open(base + "/?token=t0ken-for-test", timeout=30).status == 200
        )  # then a cookie
        assert opener.open(base + "/runs", timeout=30).status == 200
    finally:
        _stop(proc)


# --- the whole job in a browser ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
@needs_browser
def test_the_whole_job_in_a_browser(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    glossary = tmp_path / "brewing.yaml"
    glossary.write_text(BROKEN)
    shots = SHOTS or tmp_path / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    proc, base = _start(tmp_path / "workspace")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)

            # Knowledge: upload, see the broken row, fix it, generate
            page.goto(base + "/")
            expect(page.get_by_role("navigation")).to_contain_text("Ship")
            page.set_input_files("#glossary-file", str(glossary))
            page.click("#upload")
            expect(page.locator("#term-count")).to_have_text("6")
            bad_row = page.locator("#terms tr.error")
            expect(bad_row).to_have_count(1)
            expect(bad_row).to_contain_text("field 'definition' is missing or empty")
            bad_row.locator("input[name=definition]").fill(
                "Separating the sweet wort from the spent grain after mashing."
            )
            page.click("#save")
            expect(page.locator("#terms tr.error")).to_have_count(0)
            page.click("#generate")
            expect(page.locator("#train-count")).not_to_be_empty(timeout=120_000)
            page.screenshot(path=str(shots / "1-knowledge.png"), full_page=True)

            # Plan: a short training of the real model
            page.get_by_role("link", name="Plan the training").click()
            page.fill("#epochs", "5")
            page.fill("#replay", "0")
            page.locator("details summary").click()
            page.fill("#max-steps", "36")
            page.click("#estimate")
            expect(page.locator("#estimate-notice")).to_contain_text("fits", timeout=120_000)
            page.screenshot(path=str(shots / "2-plan.png"), full_page=True)
            page.click("#start")

            # Train: the chart fills, a reload re-attaches to the same run
            page.wait_for_url(re.compile(r"/train\?run="))
            # the first point comes after loading the model and one step: minutes on a busy machine
            expect(page.locator("#chart path.train")).to_have_count(1, timeout=900_000)
            page.reload()
            expect(page.locator("#status")).to_have_text(re.compile("running|completed"))
            expect(page.locator("#chart path.train")).to_have_count(1, timeout=60_000)
            page.screenshot(path=str(shots / "3-train.png"), full_page=True)
            expect(page.locator("#status")).to_have_text("completed", timeout=900_000)

            # Results: base vs tuned, from lorafit eval
            page.get_by_role("navigation").get_by_role("link", name="Results").click()
            page.click("#evaluate")
            expect(page.locator("#metrics")).to_be_visible(timeout=900_000)
            expect(page.locator("#metrics")).to_contain_text("tuned")
            expect(page.locator("#answers tbody tr").first).to_be_visible()
            page.screenshot(path=str(shots / "4-results.png"), full_page=True)

            # Try it: the tuned model answers a glossary question
            page.get_by_role("navigation").get_by_role("link", name="Try it").click()
            page.fill("#question", "What does IBU stand for?")
            page.click("#ask")
            expect(page.locator("#tuned")).to_contain_text(
                re.compile("bitterness", re.I), timeout=300_000
            )
            expect(page.locator("#base div").nth(1)).not_to_be_empty(timeout=300_000)
            expect(page.locator("#ask")).to_be_enabled(timeout=300_000)  # both answers done
            page.screenshot(path=str(shots / "5-try.png"), full_page=True)

            # Ship: an f16 GGUF and its Modelfile, downloadable
            page.get_by_role("navigation").get_by_role("link", name="Ship").click()
            page.click("#f16")
            link = page.get_by_role("link", name=re.compile(r"Download .*-f16\.gguf"))
            expect(link).to_be_visible(timeout=900_000)
            with page.expect_download() as download:
                page.get_by_role("link", name="Download its Modelfile").first.click()
            assert "FROM ./" in Path(download.value.path()).read_text()
            # the file itself (270 MB: read its magic, not the whole body into the browser)
            with urllib.request.urlopen(base + link.get_attribute("href"), timeout=60) as gguf:
                assert gguf.status == 200 and gguf.read(4) == b"GGUF"
                assert int(gguf.headers["Content-Length"]) > 100_000_000
            page.screenshot(path=str(shots / "6-ship.png"), full_page=True)

            page.get_by_role("navigation").get_by_role("link", name="Runs").click()
            expect(page.locator("#runs tbody tr")).to_have_count(1)
            page.screenshot(path=str(shots / "7-runs.png"), full_page=True)
            browser.close()
    finally:
        _stop(proc)
        _kill_jobs(tmp_path / "workspace")
    assert len(list(shots.glob("*.png"))) == 7


def test_a_question_given_up_while_waiting_leaves_the_model_free():
    """A chat request waits for the answer before it; when its client goes away meanwhile, the
    lock must not end up held by nobody (every later question would get 503 for good)."""
    import asyncio
    import threading

    from lorafit.ui.api import take_lock

    lock = threading.Lock()
    lock.acquire()  # an answer in progress

    async def give_up():
        waiting = asyncio.create_task(take_lock(lock, 5))
        await asyncio.sleep(0.2)
        waiting.cancel()  # the tab closed
        await asyncio.gather(waiting, return_exceptions=True)
        lock.release()  # the answer in progress ends
        await asyncio.sleep(0.3)

    asyncio.run(give_up())
    assert lock.acquire(blocking=False)  # free for the next question
    assert asyncio.run(take_lock(lock, 0.1)) is False  # and a held lock times out
