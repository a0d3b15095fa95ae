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
import math
import mimetypes
import re
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.models.dagrun import DagRun
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks import artifacts, settings, storage
from tasks.config import MODEL_NAME_PATTERN, RunConfig, check_publish_location
from tasks.errors import ConfigError

URL_PREFIX = "/ml-reports"
REGISTRY_DAG_ID = "transfer_learning"  # read access to it is what the registry page asks for
# what a run page may serve from the run root: the report folder and its two linked siblings
SERVED = (artifacts.REPORT.parts, artifacts.MODEL_CARD.parts, artifacts.METRICS.parts)
REPORT_INDEX = artifacts.REPORT_PAGE
RELEASE_MARK = "<!-- release -->"  # where the report template wants the run's Release section
# what a version page may serve: its report folder (with release.html), model card and metrics
VERSION_SERVED = (("report",), ("model_card.md",), ("metrics.json",))
VERSION_PATTERN = r"[0-9]{8}T[0-9]{6}\.[0-9]{3}Z-[0-9a-f]{12}"
VERSION_HEADERS = ("version", "created", "run", "test accuracy", "status", "approval", "vs champion (paired)",
                   "pages")
UNSAFE = set("\\\0?#%")  # characters a store or URI parser could read as more than a name
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'self'; base-uri 'none'")
CSS = """body{font:15px/1.45 system-ui,sans-serif;color:#222;max-width:1100px;margin:0 auto;padding:24px}
table{border-collapse:collapse;margin:8px 0}th,td{border-bottom:1px solid #eee;padding:4px 10px;text-align:left}
th{background:#f6f6f6}tr.champion td{background:#eaf5ea}code,pre{background:#f6f6f6;border-radius:4px}
pre{padding:12px;overflow-x:auto}form input{width:22em}.muted{color:#666}"""

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
    """A file of a run's evaluation, by its path under the run root (`eval/report/` = the report page, shown with
    the run's Release section)."""
    parts = _parts(path)
    if parts == artifacts.REPORT.parts and not path.endswith("/"):
        return RedirectResponse(f"{parts[-1]}/", status.HTTP_307_TEMPORARY_REDIRECT)
    if path.endswith("/"):
        parts += (REPORT_INDEX,)
    if not any(parts[:len(served)] == served for served in SERVED):
        raise HTTPException(status.HTTP_404_NOT_FOUND,
                            f"{path!r} is not served; a run page serves {', '.join('/'.join(s) for s in SERVED)}")
    run_uri = _run_uri(dag_id, run_id, session)
    uri = storage.join(run_uri, *parts)
    data = _read(uri, f"run {run_id!r} of DAG {dag_id!r} has no {'/'.join(parts)} (looked for {uri}); "
                      "the report appears when the run's evaluate task has succeeded")
    if parts == artifacts.MODEL_CARD.parts:
        return _page(f"Model card: {run_id}", _markdown(data.decode("utf-8")))
    if parts == (*artifacts.REPORT.parts, REPORT_INDEX):
        data = _with_release(data.decode("utf-8"), release_section(run_uri)).encode("utf-8")
    return _file_response(data, parts[-1])


@app.get("/versions/{model_name}/{version}/{path:path}", dependencies=[RegistryReader])
def version_file(model_name: str, version: str, path: str,
                 publish_uri: Annotated[str | None, Query()] = None) -> Response:
    """A file of a published version: its report (`report/`, `report/release.html`), model card, metrics."""
    parts = _parts(path)
    if parts == ("report",) and not path.endswith("/"):
        return RedirectResponse(f"report/{_publish_query(publish_uri)}", status.HTTP_307_TEMPORARY_REDIRECT)
    if path.endswith("/"):
        parts += (REPORT_INDEX,)
    if not any(parts[:len(served)] == served for served in VERSION_SERVED):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{path!r} is not served; a version page serves "
                                                       f"{', '.join('/'.join(s) for s in VERSION_SERVED)}")
    version_uri = _version_uri(_registry_location(publish_uri), model_name, version)
    data = _read(storage.join(version_uri, *parts), f"version {version} of {model_name} has no {'/'.join(parts)}")
    if parts == ("model_card.md",):
        return _page(f"Model card: {model_name} {version}", _markdown(data.decode("utf-8")))
    return _file_response(data, parts[-1])


@app.get("/registry", dependencies=[RegistryReader])
def registry(publish_uri: Annotated[str | None, Query()] = None,
             model_name: Annotated[str | None, Query()] = None) -> HTMLResponse:
    """The models of the deployment's publish locations; for the chosen one, every version (newest first) with its
    run, report, release page, model card, accuracy (n, 95 % interval), status and approver, and every decision."""
    from tasks.registry import list_decisions, list_versions, read_champion

    deployment = settings.load()
    publish_uri = _registry_location(publish_uri)
    try:
        models = {location: _models(location) for location in deployment.readable_publish_locations()}
        model_name = model_name or deployment.ui_model_name or next(
            iter(models[publish_uri] if isinstance(models.get(publish_uri), list) else []), RunConfig.model_name)
        check_publish_location(RunConfig(publish_uri=publish_uri, model_name=model_name),
                               deployment.readable_publish_locations())
        _use_model_store(publish_uri)
        versions = list_versions(publish_uri, model_name)
        champion = read_champion(publish_uri, model_name)
        decisions = list_decisions(publish_uri, model_name)
        details = {row["version"]: _version_details(row["uri"]) for row in versions}
    except ConfigError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from error
    except storage.StorageError as error:
        raise HTTPException(status.HTTP_502_BAD_GATEWAY, str(error)) from error
    e = html.escape
    chosen = (publish_uri, model_name)
    listing = "".join(
        f"<li><code>{e(location)}</code>: " + (
            f"<span class='muted'>{e(names)}</span>" if isinstance(names, str)
            else ", ".join(
                f"<a href='{_registry_link(location, name)}'>"
                f"{f'<b>{e(name)}</b>' if (location, name) == chosen else e(name)}</a>" for name in names)
            or "<span class='muted'>no model published yet</span>") + "</li>"
        for location, names in models.items())
    if champion:
        summary = (f"<p>Champion: <b>{e(champion['version'])}</b>, {e(champion.get('metric', 'accuracy'))} "
                   f"{_cell(champion.get('accuracy'))}, from run <code>{_cell(champion.get('run_id'))}</code>, "
                   f"promoted {_cell(champion.get('promoted_at'))}.</p>")
    else:
        summary = "<p class='muted'>No champion yet: no version has been promoted.</p>"
    rows = [_version_row(publish_uri, model_name, row, details[row["version"]], decisions) for row in versions[::-1]]
    body = (f"<h2>Models</h2><ul>{listing}</ul><h2>{e(storage.join(publish_uri, model_name))}</h2>{summary}"
            "<h3>Versions</h3>" + _html_table(VERSION_HEADERS, rows, "No complete version published yet.")
            + "<p class='muted'>Accuracy: on the version's own test split, with n and a 95 % Wilson interval; two "
              "versions tested on different images are not directly comparable.</p>"
            + "<h3>Promotion decisions</h3>"
            + _table(DECISION_COLUMNS, decisions[::-1], "No decision recorded yet."))
    return _page(f"Model registry: {model_name}", body)


def release_section(run_uri: str) -> str:
    """The run's Release section (HTML, every value escaped): the published version and its links, whether it was
    promoted and why, the paired comparison when recorded, who approved or rejected it, the serving check and
    the TFLite variants. Read from the run's publish.json and the registry's own records."""
    from tasks.registry import list_decisions

    e = html.escape
    head = "<section id='release'><h2>Release</h2>"
    try:
        published = storage.read_json(storage.join(run_uri, *artifacts.PUBLISHED.parts))
    except storage.StorageError:
        return head + ("<p class='sub'>No release recorded for this run yet: it appears here once the run has "
                       "published and decided on its version (a version waiting for approval is listed in Browse → "
                       "Model registry).</p></section>")
    try:
        location, model_name, version = _split_version_uri(str(published.get("version_uri", "")))
        version_uri = _version_uri(location, model_name, version)
        metrics = storage.read_json(storage.join(version_uri, "metrics.json"))
        decisions = [d for d in list_decisions(location, model_name)
                     if d.get("version") == version and d.get("kind") == "publish"]
    except HTTPException as error:
        return head + f"<p>{e(str(error.detail))}</p></section>"
    except storage.StorageError as error:
        return head + f"<p>The published version cannot be read: {e(str(error))}</p></section>"
    links = " &middot; ".join(f"<a href='{_version_link(location, model_name, version, path)}'>{label}</a>"
                              for label, path in (("release page", "report/release.html"), ("version's report",
                                                  "report/"), ("model card", "model_card.md")))
    lines = [f"<p>Published as version <a href='{_version_link(location, model_name, version, 'report/release.html')}'>"
             f"<code>{e(version)}</code></a> of <a href='{_registry_link(location, model_name)}'><b>{e(model_name)}"
             f"</b></a> ({links}).</p>"]
    decision = decisions[-1] if decisions else None
    if decision is None:
        lines.append("<p><b>Promotion not decided yet</b>: "
                     + ("waiting for the approval (see the run's approve task)." if published.get("eligible")
                        else "the promote task has not run yet.") + "</p>")
    else:
        verdict = "Promoted to champion" if decision.get("promoted") else "Not promoted"
        lines.append(f"<p><b>{verdict}</b>: {e(str(decision.get('reason', '')))}</p>")
        lines.append(_comparison_html(decision))
        lines.append(f"<p>{_approval_html(decision.get('approval'))}</p>")
    serving = metrics.get("serving_check") or {}
    if serving:
        diffs = ", ".join(f"{e(str(name))} {diff:.1e}" for name, diff in (serving.get("max_abs_diff") or {}).items())
        lines.append(f"<p>Serving check (a fresh process, {e(str(serving.get('n_images')))} golden test images): "
                     f"largest difference {diffs} (tolerance {e(str(serving.get('tolerance')))}).</p>")
    tflite = metrics.get("tflite") or {}
    variants = tflite.get("variants") or {}
    lines.append(f"<p>TFLite: {e(str(tflite.get('status', 'not recorded')))}</p>")
    if variants:
        rows = [[e(str(name)), _percent(entry.get("accuracy")), _megabytes(entry.get("size_bytes")),
                 "" if entry.get("latency_ms") is None else f"{entry['latency_ms']:.2f} ms",
                 "kept" if entry.get("kept") else e(str(entry.get("reason", "not kept")))]
                for name, entry in variants.items()]
        lines.append(_html_table(("variant", "test accuracy", "size", "latency per image", "kept"), rows, ""))
    return head + "".join(lines) + "</section>"


def _run_uri(dag_id: str, run_id: str, session: Any) -> str:
    """Where a DAG run keeps its artifacts: the deployment's run root (TLP_RUN_ROOT), then `<dag_id>/<run id>`
    exactly as the steps name it (tasks.config).

    Derived from deployment settings and the URL's ids only, never from XCom or the run's conf: whoever may
    trigger a run may also write those, and a run root taken from them once served any file on this host.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", dag_id) or dag_id.strip(".") == "":
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{dag_id!r} is not a DAG id")
    found = session.execute(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)).first()
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"DAG {dag_id!r} has no run {run_id!r}")
    return RunConfig(run_root=settings.load().run_root, dag_id=dag_id, run_id=run_id).run_uri


def _with_release(page: str, section: str) -> str:
    """The report page with the Release section where its template marks it (else at the top of the body)."""
    if RELEASE_MARK in page:
        return page.replace(RELEASE_MARK, section, 1)
    return re.sub(r"(<body[^>]*>)", lambda found: found.group(1) + section, page, count=1)


def _file_response(data: bytes, name: str) -> Response:
    return Response(data, media_type=_media_type(name), headers={"Content-Security-Policy": CSP,
                                                                  "X-Content-Type-Options": "nosniff"})


def _registry_location(publish_uri: str | None) -> str:
    """A publish location of this deployment (the default one when none is asked); 400 for any other."""
    deployment = settings.load()
    wanted = (publish_uri or deployment.publish_uri).rstrip("/")
    for location in deployment.readable_publish_locations():
        if location.rstrip("/") == wanted:
            _use_model_store(location)
            return location
    raise HTTPException(status.HTTP_400_BAD_REQUEST,
                        f"publish_uri={publish_uri!r} is not a publish location of this deployment; use one of "
                        f"{list(deployment.readable_publish_locations())}")


def _version_uri(location: str, model_name: str, version: str) -> str:
    """`<location>/<model>/versions/<version>`, after checking both names are plain (no path can escape)."""
    if not re.fullmatch(MODEL_NAME_PATTERN, model_name) or not re.fullmatch(VERSION_PATTERN, version):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{model_name!r} {version!r} is not a model and version")
    return storage.join(location, model_name, "versions", version)


def _split_version_uri(uri: str) -> tuple[str, str, str]:
    """(publish location, model, version) of a version URI recorded by a run, which must lie in a publish
    location of this deployment (the run's publish.json is not trusted to point anywhere else)."""
    for location in settings.load().readable_publish_locations():
        prefix = location.rstrip("/") + "/"
        rest = uri[len(prefix):].split("/") if uri.startswith(prefix) else []
        if len(rest) == 3 and rest[1] == "versions":
            _version_uri(location, rest[0], rest[2])
            _use_model_store(location)
            return location, rest[0], rest[2]
    raise HTTPException(status.HTTP_400_BAD_REQUEST,
                        f"the run recorded version {uri!r}, which is not in a publish location of this deployment")


def _models(location: str) -> list[str] | str:
    """The models that have at least one complete version in a publish location (or why it cannot be read)."""
    _use_model_store(location)
    prefix = location.rstrip("/") + "/"
    found = set()
    try:
        listed = storage.list_files(prefix)
    except storage.StorageError as error:
        return f"cannot be read: {error}"
    for uri in listed:
        parts = uri[len(prefix):].split("/")
        if len(parts) == 4 and parts[1] == "versions" and parts[3] == "checksums.json":
            found.add(parts[0])
    return sorted(found)


def _version_details(version_uri: str) -> dict:
    """What the registry shows beyond list_versions: test-set size, and the DAG run that made the version."""
    metrics = storage.read_json(storage.join(version_uri, "metrics.json"))
    try:
        params = storage.read_json(storage.join(version_uri, "params.json"))
    except storage.StorageError:
        params = {}
    return {"n_test": metrics.get("n_test"), "dag_id": params.get("dag_id"), "run_id": params.get("run_id")}


def _version_row(location: str, model_name: str, row: dict, details: dict, decisions: list[dict]) -> list[str]:
    """One registry row, as escaped HTML cells."""
    e = html.escape
    version = row["version"]
    decision = next((d for d in reversed(decisions) if d.get("version") == version and d.get("kind") == "publish"),
                    None)
    approval = (decision or {}).get("approval")
    dag_id, run_id = details.get("dag_id"), details.get("run_id")
    run = (f"<a target='_top' href='/dags/{quote(str(dag_id), safe='')}/runs/{quote(str(run_id), safe='')}'>"
           f"{e(str(run_id))}</a>" if dag_id and run_id else "<span class='muted'>not recorded</span>")
    pages = " &middot; ".join(f"<a href='{_version_link(location, model_name, version, path)}'>{label}</a>"
                              for label, path in (("report", "report/"), ("release", "report/release.html"),
                                                  ("model card", "model_card.md")))
    return [f"<code>{e(version)}</code>", e(str(row.get("created", ""))), run,
            _accuracy_html(row.get("accuracy"), details.get("n_test")), _status(row, decision),
            _approval_html(approval, short=True), _comparison_html(decision, short=True), pages]


def _status(row: dict, decision: dict | None) -> str:
    """champion / promoted before / rejected / expired / not eligible / not promoted / undecided."""
    approval = (decision or {}).get("approval") or {}
    if row.get("champion"):
        return "<b>champion</b>"
    if row.get("promoted"):
        return "promoted before"
    if decision is None:
        return "<span class='muted'>undecided</span>"
    if approval.get("timed_out"):
        return "expired (no answer)"
    if approval and not approval.get("approved"):
        return "rejected"
    if not decision.get("eligible"):
        return "not eligible"
    return "not promoted"


def _approval_html(approval: dict | None, short: bool = False) -> str:
    """Who approved or rejected, when, and their comment (escaped)."""
    e = html.escape
    if not approval:
        return "<span class='muted'>not asked</span>" if short else "No approval was asked for this promotion."
    if approval.get("timed_out"):
        return "expired" if short else "Nobody answered the approval request before it expired (counts as Reject)."
    said = f": &ldquo;{e(str(approval['comment']))}&rdquo;" if approval.get("comment") else ""
    verb = "approved" if approval.get("approved") else "rejected"
    if short:
        return f"{verb} by {e(str(approval.get('by')))}{said}"
    return f"{verb.capitalize()} by {e(str(approval.get('by')))} at {e(str(approval.get('responded_at')))}{said}"


def _comparison_html(decision: dict | None, short: bool = False) -> str:
    """The paired comparison with the champion, when the decision records one (gain, interval, p-value)."""
    if not decision or decision.get("gain") is None:
        return "" if not short else "<span class='muted'>-</span>"
    e = html.escape
    low, high = (decision.get("gain_interval") or [None, None])[:2]
    interval = "" if low is None else f" (95 % interval {low:+.4f} to {high:+.4f})"
    p_value = "" if decision.get("p_value") is None else f", p = {decision['p_value']:.3g}"
    text = f"gain {decision['gain']:+.4f}{interval}{p_value}"
    if short:
        return text
    return (f"<p>Paired comparison with champion <code>{e(str(decision.get('champion_version')))}</code> on the same "
            f"{e(str(decision.get('n_test', '?')))} test images ({e(str(decision.get('paired_test', 'paired test')))})"
            f": {text}.</p>")


def _accuracy_html(accuracy: float | None, n: int | None) -> str:
    """"88.0 % (n = 1,000; 95 % 85.8–90.0 %)": an accuracy with its test-set size and Wilson interval."""
    if accuracy is None:
        return ""
    if not n:
        return _percent(accuracy)
    low, high = wilson_interval(accuracy, n)
    return f"{_percent(accuracy)} <span class='muted'>(n = {n:,}; 95 % {low * 100:.1f}–{high * 100:.1f} %)</span>"


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy measured on n images."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _megabytes(size: int | None) -> str:
    return "" if size is None else f"{size / 1e6:.2f} MB"


def _registry_link(location: str, model_name: str) -> str:
    return html.escape(f"{URL_PREFIX}/registry?{urlencode({'publish_uri': location, 'model_name': model_name})}")


def _version_link(location: str, model_name: str, version: str, path: str) -> str:
    return html.escape(f"{URL_PREFIX}/versions/{quote(model_name)}/{quote(version)}/{path}"
                       f"{_publish_query(location)}")


def _publish_query(publish_uri: str | None) -> str:
    return f"?{urlencode({'publish_uri': publish_uri})}" if publish_uri else ""


def _html_table(headers: tuple[str, ...], rows: list[list[str]], empty: str) -> str:
    """A table of cells that are HTML already (escaped where they hold data)."""
    if not rows:
        return f"<p class='muted'>{html.escape(empty)}</p>"
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    return (f"<table><tr>{head}</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows) + "</table>")


def _parts(path: str) -> tuple[str, ...]:
    """The segments of a requested path; refuses anything that could leave the run root."""
    parts = tuple(path.rstrip("/").split("/")) if path.strip("/") else ()
    if path.startswith("/") or any(part in ("", ".", "..") or set(part) & UNSAFE for part in parts):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{path!r} is not a relative path of plain segments "
                                                         "(no '..', '.', '//', '\\', '?', '#' or '%')")
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
    storage.use_credentials(conn)


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
