"""Airflow UI pages for the pipeline: each run's evaluation report, and the model registry.

- On the page of a DAG run, an "Evaluation report" tab shows `eval/report/index.html` of that run's
  run root, with its CSVs, metrics.json and the model card (rendered from Markdown).
- A "Model registry" page (Browse menu) lists the published versions of a model, the
  champion and every promotion decision, read with tasks.registry.

Runs inside the api-server. Airflow mounts plugin apps without authentication, so every
route depends on Airflow's own checks: a valid Airflow JWT, as `Authorization: Bearer`
or the `_token` cookie the UI sets (what an iframe sends), and read access to the DAG.
Served pages may not run scripts (Content-Security-Policy): they show dataset-derived text
on Airflow's origin. S3 settings come from the DAGs' `model_store` connection when it
exists, else from the api-server's AWS_* environment.
"""
from __future__ import annotations

import html
import mimetypes
import os
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.models.xcom import XComModel
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks import artifacts, settings, storage
from tasks.config import RunConfig, check_publish_location
from tasks.errors import ConfigError

URL_PREFIX = "/ml-reports"
REGISTRY_DAG_ID = "transfer_learning"  # read access to it is what the registry page asks for
# what a run page may serve from the run root: the report folder and its two linked siblings
SERVED = (artifacts.REPORT.parts, artifacts.MODEL_CARD.parts, artifacts.METRICS.parts)
REPORT_INDEX = "index.html"
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'self'; base-uri 'none'")
CSS = """body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1100px;margin:0 auto;padding:24px}
table{border-collapse:collapse;margin:8px 0}th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
th{background:#f6f6f6}tr.champion td{background:#eaf5ea}code,pre{background:#f6f6f6;border-radius:4px}
pre{padding:12px;overflow-x:auto}form input{width:22em}.muted{color:#666}"""

VERSION_COLUMNS = (("version", "version"), ("created", "created"), ("accuracy", "accuracy"),
                   ("champion", "champion"), ("ever promoted", "promoted"), ("uri", "uri"))
DECISION_COLUMNS = (("decided at", "decided_at"), ("kind", "kind"), ("version", "version"), ("promoted", "promoted"),
                    ("new accuracy", "new_accuracy"), ("champion accuracy", "champion_accuracy"),
                    ("reason", "reason"))

RunReader = Depends(requires_access_dag("GET", DagAccessEntity.RUN))
RegistryReader = Depends(requires_access_dag("GET", param_dag_id=REGISTRY_DAG_ID))

app = FastAPI(title="ML reports", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _error_page(request: Request, error: StarletteHTTPException) -> HTMLResponse:
    """Errors as small pages: they are read in the UI's iframe, not by programs."""
    return _page(f"{error.status_code}", f"<p>{html.escape(str(error.detail))}</p>", error.status_code,
                 headers=error.headers)


@app.get("/runs/{dag_id}/{run_id}/{path:path}", dependencies=[RunReader])
def run_file(dag_id: str, run_id: str, path: str, session: SessionDep) -> Response:
    """A file of a run's evaluation, by its path under the run root (`eval/report/` = the report page)."""
    parts = _parts(path)
    if parts == artifacts.REPORT.parts and not path.endswith("/"):
        return RedirectResponse(f"{parts[-1]}/", status.HTTP_307_TEMPORARY_REDIRECT)
    if path.endswith("/"):
        parts += (REPORT_INDEX,)
    if not any(parts[:len(served)] == served for served in SERVED):
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"{path!r} is not served; a run page serves {', '.join('/'.join(s) for s in SERVED)}")
    uri = storage.join(_run_uri(dag_id, run_id, session), *parts)
    data = _read(uri, f"run {run_id!r} of DAG {dag_id!r} has no {'/'.join(parts)} (looked for {uri}); "
                      "the report appears when the run's evaluate task has succeeded")
    if parts == artifacts.MODEL_CARD.parts:
        return _page(f"Model card: {run_id}", _markdown(data.decode("utf-8")))
    return Response(data, media_type=_media_type(parts[-1]), headers={"Content-Security-Policy": CSP,
                                                                       "X-Content-Type-Options": "nosniff"})


@app.get("/registry", dependencies=[RegistryReader])
def registry(publish_uri: Annotated[str | None, Query()] = None,
             model_name: Annotated[str | None, Query()] = None) -> HTMLResponse:
    """Published versions of a model (champion highlighted) and every promotion decision, newest first."""
    from tasks.registry import list_decisions, list_versions, read_champion

    deployment = settings.load()
    publish_uri = publish_uri or deployment.publish_uri
    model_name = model_name or os.environ.get("TLP_MODEL_NAME", RunConfig.model_name)
    try:
        check_publish_location(RunConfig(publish_uri=publish_uri, model_name=model_name),
                               deployment.readable_publish_locations())
        _use_model_store(publish_uri)
        versions = list_versions(publish_uri, model_name)
        champion = read_champion(publish_uri, model_name)
        decisions = list_decisions(publish_uri, model_name)
    except ConfigError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from error
    except storage.StorageError as error:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(error)) from error
    e = html.escape
    form = (f"<form method='get'><label>Publish URI <input name='publish_uri' value='{e(publish_uri)}'></label> "
            f"<label>Model <input name='model_name' value='{e(model_name)}'></label> <button>Show</button></form>")
    if champion:
        summary = (f"<p>Champion: <b>{e(champion['version'])}</b>, {e(champion.get('metric', 'accuracy'))} "
                   f"{_cell(champion.get('accuracy'))}, from run <code>{_cell(champion.get('run_id'))}</code>, "
                   f"promoted {_cell(champion.get('promoted_at'))}.</p>")
    else:
        summary = "<p class='muted'>No champion yet: no version has been promoted.</p>"
    body = (f"{form}<h2>{e(storage.join(publish_uri, model_name))}</h2>{summary}<h3>Versions</h3>"
            + _table(VERSION_COLUMNS, versions[::-1], "No complete version published yet.", highlight="champion")
            + "<h3>Promotion decisions</h3>"
            + _table(DECISION_COLUMNS, decisions[::-1], "No decision recorded yet."))
    return _page(f"Model registry: {model_name}", body)


def _run_uri(dag_id: str, run_id: str, session: Any) -> str:
    """Where a DAG run keeps its artifacts.

    The run root is the one the run's `configure` task recorded (the config the
    run actually used), else the deployment's TLP_RUN_ROOT; below it the folder
    is `<dag_id>/<run id>` exactly as the steps name it (tasks.config).
    """
    found = session.execute(select(DagRun.conf).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).first()
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} has no run {run_id!r}")
    configured = session.scalars(select(XComModel).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == "configure",
        XComModel.key == "return_value")).first()
    config = XComModel.deserialize_value(configured) if configured is not None else {}
    root = str((config if isinstance(config, dict) else {}).get("run_root") or settings.load().run_root)
    return RunConfig(run_root=root, dag_id=dag_id, run_id=run_id).run_uri


def _parts(path: str) -> tuple[str, ...]:
    """The segments of a requested path; refuses anything that could leave the run root."""
    parts = tuple(path.rstrip("/").split("/")) if path.strip("/") else ()
    if path.startswith("/") or any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            f"{path!r} is not a relative path of plain segments (no '..', '.', '//' or '\\')")
    return parts


def _read(uri: str, missing: str) -> bytes:
    """The bytes at a URI; 404 when there is nothing, 502 when the store cannot be read."""
    try:
        _use_model_store(uri)
        return storage.read_bytes(uri)
    except storage.StorageError as error:
        try:
            gone = not storage.is_s3(uri) or not storage.exists_object(uri)
        except storage.StorageError:
            gone = False
        raise HTTPException(status.HTTP_404_NOT_FOUND if gone else status.HTTP_502_BAD_GATEWAY,
                            missing if gone else str(error)) from error


def _use_model_store(uri: str) -> None:
    """Point tasks.storage at the S3 store the DAGs use, when `uri` is on S3 and the connection exists."""
    if not storage.is_s3(uri):
        return
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        conn = Connection.get_connection_from_secrets(settings.load().model_store_conn_id)
    except AirflowNotFoundException:
        return  # no connection: the api-server's own AWS_* environment applies
    os.environ.update(storage.s3_env(conn.login, conn.password, conn.extra_dejson))


def _media_type(name: str) -> str:
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return f"{media_type}; charset=utf-8" if media_type.startswith("text/") else media_type


def _markdown(text: str) -> str:
    """Markdown (headings, lists, tables, code) as HTML; raw HTML in the text is escaped, not rendered."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "★" if value else ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("" if value is None else str(value))


def _table(columns: tuple[tuple[str, str], ...], rows: list[dict], empty: str, highlight: str = "") -> str:
    """An HTML table of `(header, key)` columns; rows whose `highlight` key is true are marked."""
    if not rows:
        return f"<p class='muted'>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(header)}</th>" for header, _ in columns)
    body = "".join(("<tr class='champion'>" if highlight and row.get(highlight) else "<tr>")
                   + "".join(f"<td>{_cell(row.get(key))}</td>" for _, key in columns) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, body: str, status_code: int = 200, headers: dict | None = None) -> HTMLResponse:
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{body}</body></html>")
    return HTMLResponse(page, status_code, headers={**(headers or {}), "Content-Security-Policy": CSP})


class MLReportsPlugin(AirflowPlugin):
    """Registers the app under /ml-reports and its two views in the UI."""

    name = "ml_reports"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "ML reports"}]
    external_views = [
        {"name": "Evaluation report", "destination": "dag_run", "url_route": "ml-report",
         "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}/{artifacts.REPORT.path}/"},
        {"name": "Model registry", "destination": "nav", "category": "browse", "url_route": "model-registry",
         "href": f"{URL_PREFIX}/registry"},
    ]
