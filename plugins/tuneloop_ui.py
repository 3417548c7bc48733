"""The tuneloop view in the Airflow UI: the adapter registry, the drift and the eval history.

The API server serves the page at ``/tuneloop-ui/`` (a FastAPI app), and the external view
puts a "tuneloop" item in the UI's navigation that shows the page inside the UI (an iframe
at ``/plugin/tuneloop``). The page is built by ``include/tuneloop/ui.py`` from the store the
DAG tasks use: ``$TUNELOOP_UI_STORE`` when set, else the settings from ``$TUNELOOP_CONFIG`` or
the ``tuneloop_config`` Variable (else the embedded defaults) with ``TUNELOOP__*`` overrides.

Routes (all but the icon need an Airflow login, the UI's session cookie or a bearer token,
whose user the auth manager lets read every DAG in ``ui.VIEW_DAG_IDS``; without a login a
browser is sent to the login page, a signed-in user without that access gets 403 naming the
DAGs; the view offers no action, so read access is all it asks):

* ``GET /tuneloop-ui/``: the page (503 with the cause named when the store cannot be read);
* ``GET /tuneloop-ui/reports/<version>/<gate file>``: a stored gate report (html, md, png, json);
* ``GET /tuneloop-ui/icon.svg``: the navigation icon.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
    from airflow.api_fastapi.auth.managers.models.batch_apis import IsAuthorizedDagRequest

    from tuneloop.storage import Store

log = logging.getLogger(__name__)

URL_PREFIX = "/tuneloop-ui"
UI_ROUTE = "tuneloop"  # the page in the Airflow UI: /plugin/tuneloop
# Same as ui.CONTENT_SECURITY_POLICY; repeated so this module imports nothing of tuneloop.
CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#51504f" '
    'stroke-width="2" stroke-linecap="round" stroke-linejoin="round">'
    '<path d="M3 3v18h18"/><path d="M7 15l4-4 3 3 6-7"/><circle cx="20" cy="7" r="1.2"/></svg>'
)

app = FastAPI(
    title="tuneloop view",
    description="The adapter registry, the drift history and the eval history of tuneloop.",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


@app.get("/", response_class=HTMLResponse)
async def view(request: Request) -> Response:
    """The page: registry table, drift history plot, eval history plot."""
    refusal = await _require_read_access(request)
    if refusal is not None:
        return refusal
    from tuneloop import ui

    page = await run_in_threadpool(ui.build_page, _open_store, base=_base(request))
    return HTMLResponse(page.html, status_code=page.status, headers=_headers())


@app.get("/reports/{version}/{name}")
async def report(request: Request, version: str, name: str) -> Response:
    """A file of the gate report stored for ``version`` (opened from the registry table)."""
    refusal = await _require_read_access(request)
    if refusal is not None:
        return refusal
    from tuneloop import ui

    def read() -> tuple[bytes, str]:
        store, _ = _open_store()
        return ui.report_file(store, version, name)

    try:
        data, media_type = await run_in_threadpool(read)
    except ui.ViewNotFoundError as err:
        return PlainTextResponse(str(err), status_code=404, headers=_headers())
    except Exception as err:  # name the cause, never a stack trace
        log.exception("tuneloop view: cannot read report %s/%s", version, name)
        return PlainTextResponse(f"cannot read the tuneloop store: {type(err).__name__}: {err}", status_code=503, headers=_headers())
    return Response(data, media_type=media_type, headers=_headers())


@app.get("/icon.svg")
async def icon() -> Response:
    return Response(ICON, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def _base(request: Request) -> str:
    """The URL path this app is mounted at (``/tuneloop-ui``, or below Airflow's base path)."""
    return str(request.scope.get("root_path") or URL_PREFIX).rstrip("/")


async def _require_read_access(request: Request) -> Response | None:
    """None for a signed-in user whom Airflow's auth manager lets read the tuneloop DAGs.
    Otherwise: not signed in, a redirect to the login page (401 for a client that is not a
    browser); signed in without read access to every DAG in ``ui.VIEW_DAG_IDS``, 403."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    try:
        user = await get_user(request, None, await bearer_scheme(request))
    except HTTPException as err:
        if "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse(f"{err.detail}: sign in to Airflow first", status_code=err.status_code)
        return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
    denied = await run_in_threadpool(_dags_denied, user)
    if denied:
        from tuneloop import ui

        log.warning("tuneloop view refused to %s: no read access to %s", user.get_name(), ", ".join(denied))
        return PlainTextResponse(ui.forbidden_message(user.get_name(), denied), status_code=403, headers=_headers())
    return None


def _dags_denied(user: BaseUser) -> list[str]:
    """The DAGs of ``ui.VIEW_DAG_IDS`` the user may not read, asked as Airflow's own routes ask
    (``requires_access_dag``): GET on each DAG, with the team that owns it, if any."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.models.dag import DagModel

    from tuneloop import ui

    teams = DagModel.get_dag_id_to_team_name_mapping(list(ui.VIEW_DAG_IDS))
    requests: list[IsAuthorizedDagRequest] = [
        {"method": "GET", "details": DagDetails(id=dag_id, team_name=teams.get(dag_id))} for dag_id in ui.VIEW_DAG_IDS
    ]
    auth_manager = get_auth_manager()
    if auth_manager.batch_is_authorized_dag(requests, user=user):
        return []
    denied = [
        dag_id
        for dag_id, request in zip(ui.VIEW_DAG_IDS, requests, strict=True)
        if not auth_manager.is_authorized_dag(method="GET", details=request["details"], user=user)
    ]
    return denied or list(ui.VIEW_DAG_IDS)


def _open_store() -> tuple[Store, str]:
    from tuneloop import ui

    return ui.open_view_store(config_variable=_config_variable)


def _config_variable() -> str | None:
    from airflow.models.variable import Variable

    return Variable.get("tuneloop_config", default_var=None)


class TuneloopUiPlugin(AirflowPlugin):
    name = "tuneloop_ui"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "tuneloop view"}]
    external_views = [
        {
            "name": "tuneloop",
            "href": f"{URL_PREFIX}/",
            "icon": f"{URL_PREFIX}/icon.svg",
            "url_route": UI_ROUTE,
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
