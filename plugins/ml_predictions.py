"""Airflow UI page for batch scoring: on the page of a `batch_predict` run, a "Predictions" tab shows the
least confident predictions (thumbnails with their top-k), the counts per class, the shift verdicts (of the
confidences, and of the embeddings with their AUC, noise band and threshold) and the unreadable files, i.e.
the gallery merge_predictions wrote, and `summary.json` beside it.

Where a run's files are is derived from the deployment's settings (TLP_RUN_ROOT) and the run's dag and run id,
exactly as tasks.batch_config names them; nothing is read from XCom or the run's conf. Airflow mounts plugin
apps without authentication, so every route depends on Airflow's own checks (a valid JWT and read access to
the DAG's runs), and served pages may not run scripts (Content-Security-Policy).
"""
from __future__ import annotations

import html
import os

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, status
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select

from tasks import artifacts, settings, storage
from tasks.batch_config import run_uri

URL_PREFIX = "/ml-predictions"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'self'; base-uri 'none'"
SERVED = {"gallery": (artifacts.BATCH_GALLERY, "text/html; charset=utf-8"),
          "summary.json": (artifacts.BATCH_SUMMARY, "application/json")}

RunReader = Depends(requires_access_dag("GET", DagAccessEntity.RUN))

app = FastAPI(title="ML predictions", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/runs/{dag_id}/{run_id}/{name}", dependencies=[RunReader])
def run_predictions(dag_id: str, run_id: str, name: str, session: SessionDep) -> Response:
    """The gallery page or the summary of one batch-scoring run."""
    if name not in SERVED:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{name!r} is not served; use one of {sorted(SERVED)}")
    if session.execute(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).first() is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} has no run {run_id!r}")
    artifact, media_type = SERVED[name]
    uri = storage.join(run_uri(settings.load().run_root, dag_id, run_id), *artifact.parts)
    try:
        _use_model_store(uri)
        data = storage.read_bytes(uri)
    except storage.StorageError:
        message = (f"run {run_id!r} of DAG {dag_id!r} has no {artifact.path} (looked for {uri}); it appears when "
                   "the run's merge_predictions task has succeeded")
        return HTMLResponse(f"<!doctype html><p>{html.escape(message)}</p>", status.HTTP_404_NOT_FOUND,
                            headers={"Content-Security-Policy": CSP})
    return Response(data, media_type=media_type, headers={"Content-Security-Policy": CSP,
                                                          "X-Content-Type-Options": "nosniff"})


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


class MLPredictionsPlugin(AirflowPlugin):
    """Registers the app under /ml-predictions and the run page's "Predictions" tab."""

    name = "ml_predictions"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "ML predictions"}]
    external_views = [
        {"name": "Predictions", "destination": "dag_run", "url_route": "ml-predictions",
         "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}/gallery"},
    ]
