"""The launched app with --auth: before the login no route but the login page and static files answers,
the page names no run, and nothing can be started or cancelled; after the login the run list is there."""

import json
import subprocess

import pytest
import requests

from test_app_api import AUTH, launch_app, stop  # noqa: E402  (skips without gradio_client)
from test_app_runs import make_run

SECRET = "zebra-secret-run"


@pytest.fixture
def app_with_a_run(tmp_path):
    runs_dir = tmp_path / "runs"
    trainer = subprocess.Popen(["sleep", "300"])  # stands in for a run's trainer: a cancel would kill it
    run_dir = make_run(runs_dir, SECRET, state="running", step=3, pid=trainer.pid)
    proc, url = launch_app(runs_dir, "--auth", ":".join(AUTH))
    yield url, runs_dir, run_dir, trainer
    stop(proc)
    trainer.kill()
    trainer.wait()


def test_nothing_answers_before_login(app_with_a_run):
    url, runs_dir, run_dir, trainer = app_with_a_run
    status_before = (run_dir / "status.json").read_text()
    anonymous = requests.Session()
    page = anonymous.get(url, timeout=10)
    assert page.status_code == 200 and '"auth_required":true' in page.text  # the login page
    assert SECRET not in page.text
    event = {"session_hash": "x", "fn_index": 0, "event_id": "y", "data": [SECRET], "trigger_id": None}
    refused = [("get", "gradio_api/runs"), ("get", "config"), ("get", "gradio_api/info"),
               ("post", "gradio_api/cancel"), ("post", "gradio_api/reset"), ("post", "gradio_api/call/runs"),
               ("post", "gradio_api/call/cancel"), ("post", "gradio_api/run/cancel"), ("post", "gradio_api/call/start"),
               ("post", "gradio_api/queue/join"), ("get", "gradio_api/app_id"), ("get", "gradio_api/user"),
               ("get", "gradio_api/heartbeat/x"), ("get", f"gradio_api/file={run_dir / 'status.json'}")]
    for method, route in refused:
        r = anonymous.request(method, url + route, json=event, timeout=10)
        assert r.status_code == 401, (method, route, r.status_code, r.text[:200])
        assert SECRET not in r.text
    assert anonymous.get(url + "theme.css", timeout=10).status_code == 200  # static files stay public
    assert anonymous.post(url + "login", data={"username": AUTH[0], "password": "wrong"}, timeout=10).status_code == 400
    assert anonymous.post(url + "gradio_api/cancel", json=event, timeout=10).status_code == 401  # still out

    # nothing was cancelled or started
    assert trainer.poll() is None and (run_dir / "status.json").read_text() == status_before
    assert [p.name for p in runs_dir.iterdir()] == [SECRET]

    # after the login: the run list, through the same API a script uses
    from gradio_client import Client

    runs = Client(url, auth=AUTH, verbose=False).predict(api_name="/runs")
    assert [(r["name"], r["state"], r["step"]) for r in runs] == [(SECRET, "running", 3)]
    member = requests.Session()
    assert member.post(url + "login", data={"username": AUTH[0], "password": AUTH[1]}, timeout=10).status_code == 200
    assert member.get(url + "gradio_api/info", timeout=10).status_code == 200
    assert json.loads(member.get(url + f"gradio_api/file={run_dir / 'status.json'}", timeout=10).text)["step"] == 3
