"""The ML reports plugin, mounted in Airflow's own api-server app: report pages behind Airflow's
auth (Bearer header and the UI's `_token` cookie), path safety, the registry page, plugin loading."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import jwt
import pytest

from tasks import artifacts, storage
from tasks.config import RunConfig
from tests.helpers.airflow import mint_token as _token

ROOT = Path(__file__).resolve().parents[1]
DAG_ID = "transfer_learning"
RUN_ID = "manual__2026-01-02T03:04:05+00:00"
REPORT_HTML = "<!doctype html><html><body><h1>fashion-mnist-classifier</h1><a href='../model_card.md'>card</a>"
MODEL_CARD = "# Model card\n\n| metric | value |\n|---|---|\n| accuracy | 0.91 |\n\n- <script>alert(1)</script>\n"


@pytest.fixture
def token(api) -> str:
    return _token("viewer", "viewer")


def _add_run(run_id: str, conf: dict, configured: dict | None = None) -> None:
    """A DAG run row; `configured` is what its `configure` task returned (the resolved config)."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        run = DagRun(dag_id=DAG_ID, run_id=run_id, conf=conf, run_type="manual", state="success")
        session.add(run)
        session.flush()
        run_pk = run.id
    if configured is not None:
        from airflow import settings
        from sqlalchemy import insert

        # no task-instance row exists for this hand-made run, so skip SQLite's foreign-key check
        with settings.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.execute(insert(XComModel.__table__).values(
                dag_run_id=run_pk, task_id="configure", map_index=-1, key="return_value", dag_id=DAG_ID,
                run_id=run_id, value=XComModel.serialize_value(configured)))
            connection.commit()
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")


def _write_evaluation(run_root: str, run_id: str) -> None:
    """What the evaluate step leaves under a run root, in miniature."""
    run = RunConfig(run_root=run_root, dag_id=DAG_ID, run_id=run_id).run_uri
    storage.write_text(storage.join(run, *artifacts.REPORT.parts, "index.html"), REPORT_HTML)
    storage.write_text(storage.join(run, *artifacts.REPORT.parts, "most_wrong.csv"), "path,true,predicted\na.png,1,2\n")
    storage.write_text(storage.join(run, *artifacts.MODEL_CARD.parts), MODEL_CARD)
    storage.write_json(storage.join(run, *artifacts.METRICS.parts), {"accuracy": 0.91})
    storage.write_text(storage.join(run, "params.json"), "{}")


def _release_of(page: str) -> str:
    """The Release section the plugin adds to a report page."""
    start = page.index("<section id='release'>")
    return page[start:page.index("</section>", start) + len("</section>")]


def _report_url(run_id: str) -> str:
    """The URL the UI's run tab opens: the plugin's `dag_run` view with the ids filled in."""
    return f"/ml-reports/runs/{DAG_ID}/{run_id}/{artifacts.REPORT.path}/"


@pytest.fixture
def run_id(api, tmp_path, monkeypatch) -> str:
    """A finished run of a deployment whose run root is TLP_RUN_ROOT, with its evaluation written."""
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "runs"))
    run_id = f"{RUN_ID}-{tmp_path.name}"
    _write_evaluation(str(tmp_path / "runs"), run_id)
    _add_run(run_id, {"epochs": 2}, configured={"run_root": str(tmp_path / "runs")})
    return run_id


@pytest.mark.fast
def test_report_is_served_with_a_bearer_token(api, run_id, token):
    response = api.get(_report_url(run_id), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.text.replace(_release_of(response.text), "") == REPORT_HTML
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]


@pytest.mark.fast
def test_report_is_served_with_the_ui_session_cookie(api, run_id, token):
    """The UI's iframe sends the `_token` cookie, not a header."""
    api.cookies.set("_token", token)
    try:
        response = api.get(_report_url(run_id))
    finally:
        api.cookies.clear()
    assert response.status_code == 200, response.text
    assert "fashion-mnist-classifier" in response.text


@pytest.mark.parametrize("credentials, status", [
    ({}, 401),
    ({"Authorization": "Bearer not-a-jwt"}, 403),
    ({"cookie": "_token=not-a-jwt"}, 403),
])
@pytest.mark.fast
def test_report_refuses_anonymous_and_malformed_credentials(api, run_id, credentials, status):
    response = api.get(_report_url(run_id), headers=credentials)
    assert response.status_code == status
    assert "fashion-mnist-classifier" not in response.text


@pytest.mark.fast
def test_report_refuses_forged_expired_and_roleless_tokens(api, run_id):
    valid = _token("viewer", "viewer")
    forged = jwt.encode(jwt.decode(valid, options={"verify_signature": False}), "not-the-secret-" + "x" * 64,
                        algorithm="HS512")
    expired = _token("viewer", "viewer", expiration_time_in_seconds=-3600)
    for bad, status in ((forged, 403), (expired, 401), (_token("nobody", None), 403)):
        response = api.get(_report_url(run_id), headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == status, bad
        assert "fashion-mnist-classifier" not in response.text


@pytest.mark.fast
def test_report_siblings_are_served_with_their_content_types(api, run_id, token):
    base = _report_url(run_id)
    auth = {"Authorization": f"Bearer {token}"}
    csv = api.get(base + "most_wrong.csv", headers=auth)
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    metrics = api.get(base + "../metrics.json", headers=auth)
    assert metrics.status_code == 200 and metrics.json() == {"accuracy": 0.91}
    card = api.get(base + "../model_card.md", headers=auth)
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/html")
    assert "<table>" in card.text and "<h1>Model card</h1>" in card.text
    assert "<script>" not in card.text and "&lt;script&gt;" in card.text


@pytest.mark.fast
def test_report_folder_without_slash_redirects_so_relative_links_work(api, run_id, token):
    url = _report_url(run_id).rstrip("/")
    response = api.get(url, headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == f"{artifacts.REPORT.parts[-1]}/"


@pytest.mark.parametrize("path, status", [
    ("eval/report/%2e%2e/%2e%2e/params.json", 400),
    ("eval/report/%2E%2E%2F%2E%2E%2Fparams.json", 400),
    ("%2Fetc%2Fpasswd", 400),
    ("eval//report/index.html", 400),
    ("eval/report/..%5C..%5Cparams.json", 400),
    ("eval/report/index.html%23", 400),
    ("eval/report/a%3Fb.csv", 400),
    ("params.json", 404),
    ("model/model.keras", 404),
    ("eval/report/missing.png", 404),
])
@pytest.mark.fast
def test_paths_outside_the_evaluation_are_refused(api, run_id, token, path, status):
    response = api.get(f"/ml-reports/runs/{DAG_ID}/{run_id}/{path}",
                       headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == status, response.text


@pytest.mark.fast
def test_run_before_configure_uses_the_deployment_run_root(api, token, tmp_path, monkeypatch):
    """A run whose configure task has not finished: the run root is the deployment's TLP_RUN_ROOT."""
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "shared-runs"))
    run_id = "scheduled__" + tmp_path.name
    _write_evaluation(str(tmp_path / "shared-runs"), run_id)
    _add_run(run_id, {})
    response = api.get(_report_url(run_id), headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("forged_root", ["file:///proc/self/environ#", "{tmp}/elsewhere"])
def test_a_forged_configure_xcom_does_not_move_what_the_plugin_reads(api, token, tmp_path, monkeypatch,
                                                                      forged_root):
    """XCom is user-writable: a run root written there (once: the api-server's environment) is ignored."""
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "deployment-runs"))
    run_id = "manual__forged-" + tmp_path.name
    _write_evaluation(str(tmp_path / "deployment-runs"), run_id)
    elsewhere = RunConfig(run_root=str(tmp_path / "elsewhere"), dag_id=DAG_ID, run_id=run_id)
    storage.write_json(storage.join(elsewhere.run_uri, *artifacts.METRICS.parts), {"accuracy": "forged"})
    _add_run(run_id, {"run_root": "file:///proc/self/environ#"},
             configured={"run_root": forged_root.format(tmp=tmp_path)})
    auth = {"Authorization": f"Bearer {token}"}
    metrics = api.get(_report_url(run_id) + "../metrics.json", headers=auth)
    assert metrics.status_code == 200 and metrics.json() == {"accuracy": 0.91}
    assert "PATH=" not in metrics.text and "forged" not in metrics.text


@pytest.mark.parametrize("dag_id", ["..", ".", "a%2Fb", "a%23b"])
def test_a_dag_id_that_could_leave_the_run_root_is_refused(api, token, dag_id):
    response = api.get(f"/ml-reports/runs/{dag_id}/x/eval/metrics.json", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code in (400, 403, 404) and "accuracy" not in response.text


@pytest.mark.fast
def test_report_reads_an_s3_run_root_with_the_model_store_connection(api, token, s3, s3_bucket, monkeypatch):
    """The api-server reaches S3 like the DAGs do: through the `model_store` connection, no AWS_* env."""
    run_id = "manual__s3-run"
    _write_evaluation(f"{s3_bucket}/runs", run_id)
    _add_run(run_id, {})
    monkeypatch.setenv("TLP_RUN_ROOT", f"{s3_bucket}/runs")
    for key in s3.env():
        monkeypatch.delenv(key)
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_STORE", s3.airflow_connection())
    auth = {"Authorization": f"Bearer {token}"}
    page = api.get(_report_url(run_id), headers=auth).text
    assert page.replace(_release_of(page), "") == REPORT_HTML
    assert api.get(_report_url(run_id) + "nothing.png", headers=auth).status_code == 404


@pytest.mark.fast
def test_missing_run_or_report_says_what_is_missing(api, token, tmp_path):
    auth = {"Authorization": f"Bearer {token}"}
    no_run = api.get(_report_url("no-such-run"), headers=auth)
    assert no_run.status_code == 404 and "has no run" in no_run.text
    run_id = "running__" + tmp_path.name
    _add_run(run_id, {})
    no_report = api.get(_report_url(run_id), headers=auth)
    assert no_report.status_code == 404 and "evaluate task has succeeded" in no_report.text


def _write_registry(publish: Path, model: str) -> tuple[str, str]:
    """Two complete versions (the second the champion), one interrupted upload, two decisions."""
    from tasks.registry import VERSION_TIME

    old, new, interrupted = (f"{datetime(2026, 1, day):{VERSION_TIME}}-{hex_digit * 12}"
                             for day, hex_digit in ((1, "a"), (2, "b"), (3, "c")))
    for version, accuracy in ((old, 0.81), (new, 0.88), (interrupted, 0.99)):
        storage.write_json(str(publish / model / "versions" / version / "metrics.json"), {"accuracy": accuracy})
    for version in (old, new):
        storage.write_json(str(publish / model / "versions" / version / "checksums.json"), {})
    for n, version in enumerate((old, new)):
        storage.write_json(str(publish / model / "promotions" / f"2026010{n + 1}T000001000000Z-{version}.json"),
                           {"version": version, "promoted": True, "kind": "publish", "decided_at": f"2026-01-0{n + 1}",
                            "new_accuracy": [0.81, 0.88][n], "champion_accuracy": [None, 0.80][n],
                            "reason": ["no champion yet", "beats <b>champion</b>"][n]})
    storage.write_json(str(publish / model / "champion.json"),
                       {"version": new, "accuracy": 0.88, "metric": "accuracy", "run_id": "manual__2",
                        "promoted_at": "2026-01-02T00:00:01"})
    return old, new


@pytest.mark.fast
def test_registry_lists_versions_and_the_champion(api, token, tmp_path, monkeypatch):
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path / "models"))
    old, new = _write_registry(tmp_path / "models", "fmnist")
    response = api.get("/ml-reports/registry", params={"publish_uri": str(tmp_path / "models"),
                                                        "model_name": "fmnist"},
                       headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    page = response.text
    assert f"Champion: <b>{new}</b>" in page and "0.8800" in page
    assert page.index(new) < page.index(old)  # newest first
    assert f"<tr><td><code>{new}</code></td>" in page
    assert "<b>champion</b>" in page and "promoted before" in page
    assert "cccccccccccc" not in page  # no checksums.json: an interrupted upload is not a version
    assert "beats &lt;b&gt;champion&lt;/b&gt;" in page


@pytest.mark.fast
def test_registry_defaults_come_from_the_environment(api, token, tmp_path, monkeypatch):
    _write_registry(tmp_path / "models", "env-model")
    monkeypatch.setenv("TLP_PUBLISH_URI", str(tmp_path / "models"))
    monkeypatch.setenv("TLP_MODEL_NAME", "env-model")
    response = api.get("/ml-reports/registry", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and "bbbbbbbbbbbb" in response.text


@pytest.mark.fast
def test_registry_reads_only_the_configured_publish_locations(api, token, tmp_path, monkeypatch):
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path / "models"))
    _write_registry(tmp_path / "elsewhere", "fmnist")
    response = api.get("/ml-reports/registry", params={"publish_uri": str(tmp_path / "elsewhere"),
                                                        "model_name": "fmnist"},
                       headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 400 and "not a publish location" in response.text
    assert "bbbbbbbbbbbb" not in response.text


@pytest.mark.fast
def test_registry_refuses_anonymous_and_bad_model_names(api, token, tmp_path, monkeypatch):
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path))
    assert api.get("/ml-reports/registry").status_code == 401
    bad = api.get("/ml-reports/registry", params={"publish_uri": str(tmp_path), "model_name": "../etc"},
                  headers={"Authorization": f"Bearer {token}"})
    assert bad.status_code == 400 and "model_name" in bad.text


@pytest.mark.fast
def test_ui_lists_the_report_tab_and_the_registry_page(api, token):
    response = api.get("/api/v2/plugins", headers={"Authorization": f"Bearer {token}"})
    plugin = next(p for p in response.json()["plugins"] if p["name"] == "ml_reports")
    views = {view["destination"]: view for view in plugin["external_views"]}
    assert views["dag_run"]["href"] == "/ml-reports/runs/{DAG_ID}/{RUN_ID}/" + artifacts.REPORT.path + "/"
    assert views["dag_run"]["url_route"] and views["nav"]["url_route"]
    assert views["nav"]["href"] == "/ml-reports/registry"
    assert plugin["fastapi_apps"][0]["url_prefix"] == "/ml-reports"


@pytest.mark.fast
def test_plugins_manager_loads_the_plugin_without_heavy_imports():
    """What `airflow plugins` does, in a fresh interpreter: no import error, no TensorFlow or boto3."""
    script = ("import json, sys\nfrom airflow import plugins_manager\n"
              "info = {p['name']: p for p in plugins_manager.get_plugin_info()}\n"
              "print(json.dumps({'views': [v['href'] for v in info['ml_reports']['external_views']],"
              " 'errors': plugins_manager.get_import_errors(),"
              " 'heavy': [m for m in ('tensorflow', 'keras', 'boto3') if m in sys.modules]}))\n")
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["errors"] == {}
    assert loaded["heavy"] == []
    assert "/ml-reports/registry" in loaded["views"]


VERSION = "20260105T000000.000Z-dddddddddddd"


def _write_release(run_root: str, run_id: str, publish: Path, model: str = "fmnist", version: str = VERSION,
                   approval: dict | None = None, version_uri: str | None = None) -> str:
    """A published, decided version of a run: run publish.json, the version's files and its decision record."""
    run = RunConfig(run_root=run_root, dag_id=DAG_ID, run_id=run_id)
    uri = str(publish / model / "versions" / version)
    storage.write_json(storage.join(run.run_uri, *artifacts.PUBLISHED.parts),
                       {"version_uri": version_uri or uri, "eligible": True})
    storage.write_json(f"{uri}/metrics.json", {
        "accuracy": 0.9, "n_test": 1000,
        "serving_check": {"n_images": 32, "max_abs_diff": {"saved_model": 1.2e-7}, "tolerance": 1e-4},
        "tflite": {"status": "converted", "variants": {
            "float16": {"accuracy": 0.899, "size_bytes": 6_800_000, "latency_ms": 5.4, "kept": True},
            "int8": {"accuracy": 0.7, "size_bytes": 3_400_000, "latency_ms": 2.0, "kept": False,
                     "reason": "accuracy -0.2000 beyond <limit>"}}}})
    storage.write_json(f"{uri}/params.json", {"dag_id": DAG_ID, "run_id": run_id})
    storage.write_text(f"{uri}/report/release.html", "<h1>release checks</h1>")
    storage.write_text(f"{uri}/model_card.md", MODEL_CARD)
    storage.write_json(f"{uri}/checksums.json", {})
    storage.write_json(str(publish / model / "promotions" / f"20260105T000001000000Z-{version}.json"), {
        "kind": "publish", "version": version, "promoted": True, "eligible": True, "reason": "beats the champion",
        "approval": approval, "decided_at": "2026-01-05", "new_accuracy": 0.9, "champion_version": "v0",
        "gain": 0.006, "gain_interval": [-0.01, 0.022], "p_value": 0.41, "n_test": 1000, "paired_test": "McNemar"})
    return uri


@pytest.fixture
def published_run(api, tmp_path, monkeypatch):
    monkeypatch.setenv("TLP_RUN_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("TLP_PUBLISH_LOCATIONS", str(tmp_path / "models"))
    run_id = "manual__released-" + tmp_path.name
    _write_evaluation(str(tmp_path / "runs"), run_id)
    _add_run(run_id, {})
    return run_id


def test_report_shows_the_run_release_with_decision_approver_and_tflite(api, token, tmp_path, published_run):
    _write_release(str(tmp_path / "runs"), published_run, tmp_path / "models",
                   approval={"approved": True, "by": "alice (alice)", "comment": "<b>ship</b> it",
                             "responded_at": "2026-01-05T00:00:00", "timed_out": False})
    page = api.get(_report_url(published_run), headers={"Authorization": f"Bearer {token}"}).text
    release = page[page.index("<section id='release'>"):]
    assert "Promoted to champion" in release and VERSION in release
    assert "Approved by alice (alice)" in release and "&lt;b&gt;ship&lt;/b&gt; it" in release
    assert "<b>ship</b>" not in page
    assert "float16" in release and "89.9 %" in release and "6.80 MB" in release and "5.40 ms" in release
    assert "accuracy -0.2000 beyond &lt;limit&gt;" in release  # a dropped variant says why
    assert "1.2e-07" in release  # serving check
    assert "gain +0.0060 (95 % interval -0.0100 to +0.0220), p = 0.41" in release and "McNemar" in release
    assert "/ml-reports/versions/fmnist/" + VERSION + "/report/release.html?publish_uri=" in release


def test_release_page_and_model_card_of_a_version_are_served(api, token, tmp_path, published_run):
    _write_release(str(tmp_path / "runs"), published_run, tmp_path / "models")
    auth = {"Authorization": f"Bearer {token}"}
    query = {"publish_uri": str(tmp_path / "models")}
    release = api.get(f"/ml-reports/versions/fmnist/{VERSION}/report/release.html", params=query, headers=auth)
    assert release.status_code == 200 and "release checks" in release.text
    card = api.get(f"/ml-reports/versions/fmnist/{VERSION}/model_card.md", params=query, headers=auth)
    assert card.status_code == 200 and "<h1>Model card</h1>" in card.text and "<script>" not in card.text
    for bad in (f"/ml-reports/versions/fmnist/{VERSION}/params.json", "/ml-reports/versions/fmnist/..%2F..%2Fx/"
                "model_card.md", "/ml-reports/versions/fmnist/not-a-version/model_card.md"):
        assert api.get(bad, params=query, headers=auth).status_code in (400, 404), bad
    elsewhere = api.get(f"/ml-reports/versions/fmnist/{VERSION}/model_card.md",
                        params={"publish_uri": str(tmp_path)}, headers=auth)
    assert elsewhere.status_code == 400


def test_release_of_a_version_outside_the_publish_locations_is_not_read(api, token, tmp_path, published_run):
    _write_release(str(tmp_path / "runs"), published_run, tmp_path / "elsewhere")
    page = api.get(_report_url(published_run), headers={"Authorization": f"Bearer {token}"}).text
    assert "not in a publish location" in page and "float16" not in page


def test_release_section_before_publish_says_so(api, token, published_run):
    page = api.get(_report_url(published_run), headers={"Authorization": f"Bearer {token}"}).text
    assert "<section id='release'><h2>Release</h2>" in page and "No release recorded for this run yet" in page


def test_registry_lists_models_and_each_version_with_run_accuracy_interval_status_and_approver(
        api, token, tmp_path, published_run):
    _write_registry(tmp_path / "models", "fmnist")
    _write_release(str(tmp_path / "runs"), published_run, tmp_path / "models", version=VERSION,
                   approval={"approved": False, "by": "bob (bob)", "comment": "too noisy", "timed_out": False})
    _write_release(str(tmp_path / "runs"), published_run, tmp_path / "models", model="other")
    page = api.get("/ml-reports/registry", params={"publish_uri": str(tmp_path / "models"), "model_name": "fmnist"},
                   headers={"Authorization": f"Bearer {token}"}).text
    models = page[page.index("<h2>Models</h2>"):page.index("</ul>")]
    assert ">other</a>" in models and "<b>fmnist</b>" in models
    row = page[page.index(f"<tr><td><code>{VERSION}</code>"):].split("</tr>")[0]
    assert f"/dags/{DAG_ID}/runs/" in row and "90.0 %" in row and "n = 1,000" in row and "88.0–91.7 %" in row
    assert "rejected by bob (bob): &ldquo;too noisy&rdquo;" in row and ">rejected<" not in row
    assert "gain +0.0060" in row and "report/release.html" in row and "model_card.md" in row
