"""Alert webhook for the Airflow API server: ``POST /tuneloop/alerts``.

A Prometheus Alertmanager or Grafana webhook that fires records an event on the drift asset
``tuneloop://loop/drift``, which triggers ``tuneloop_refresh``. Auth is a shared bearer token
(``$TUNELOOP_ALERT_TOKEN`` or the Variable ``tuneloop_alert_token``; none set: every call gets
503). Payload checks, the alert filter and the event's ``extra`` live in
``include/tuneloop/alerts.py``; this file is the HTTP wiring, and it records the event through
Airflow's asset manager as ``POST /api/v2/assets/events`` does.

Answers: 202 ``{"recorded": true, "asset_event_id": ...}``; 200 ``{"recorded": false,
"reason": ...}`` (only resolved alerts, or none matches the filter); 400/413/422 ``{"detail"}``
for a body we cannot read; 401 bad or missing token; 503 no token configured, a malformed
``TUNELOOP_ALERT_MATCH``, or the asset not parsed yet.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tuneloop import alerts
from tuneloop.assets import DRIFT

log = logging.getLogger(__name__)

URL_PREFIX = "/tuneloop"

app = FastAPI(
    title="tuneloop alerts",
    description="Alertmanager / Grafana webhooks that trigger a tuneloop refresh through the drift asset.",
)


@app.post("/alerts", status_code=202)
async def receive_alert(request: Request) -> JSONResponse:
    """Record a drift event for the firing alerts of an Alertmanager or Grafana webhook."""
    refusal = await run_in_threadpool(_refuse_unauthorized, request.headers.get("authorization"))
    if refusal is not None:
        return refusal
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > alerts.MAX_BODY_BYTES:
        return _error(413, f"body is {declared} bytes, above the limit of {alerts.MAX_BODY_BYTES}")
    try:
        alert_filter = alerts.AlertFilter.from_env(os.environ)
        notification = alerts.parse_notification(await request.body())
    except alerts.AlertPayloadError as err:
        return _error(err.status_code, err.reason)
    except ValueError as err:  # a malformed filter in the server's environment
        return _error(503, f"alert filter misconfigured: {err}")
    decision = alerts.decide(notification, alert_filter)
    if not decision.record:
        log.info("tuneloop alert from %s not recorded: %s", notification.source, decision.reason)
        return JSONResponse({"recorded": False, "reason": decision.reason, "source": notification.source})
    extra = alerts.drift_event_extra(notification, decision.alerts)
    return await run_in_threadpool(_record_drift_event, extra)


def _refuse_unauthorized(authorization: str | None) -> JSONResponse | None:
    outcome = alerts.check_bearer(authorization, alerts.configured_token(os.environ, _token_variable))
    if outcome is alerts.AuthOutcome.OK:
        return None
    if outcome is alerts.AuthOutcome.NOT_CONFIGURED:
        return _error(outcome.status_code, alerts.NOT_CONFIGURED_MESSAGE)
    log.warning("tuneloop alert refused: %s", outcome.value)
    return _error(outcome.status_code, f"{outcome.value}: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})


def _token_variable() -> str | None:
    from airflow.models.variable import Variable

    return Variable.get(alerts.TOKEN_VARIABLE, default_var=None)


def _record_drift_event(extra: dict[str, Any]) -> JSONResponse:
    """Record the event the way ``POST /api/v2/assets/events`` does: Airflow's asset manager
    queues every unpaused DAG scheduled on the asset, and the scheduler starts its run."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    name, uri = DRIFT
    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == name, AssetModel.uri == uri))
        if asset is None:
            return _error(503, f"asset {uri} is not registered yet: the DAG processor has not parsed tuneloop_refresh")
        consumers = {ref.dag_id: bool(ref.dag.is_paused) for ref in asset.scheduled_dags}
        event = asset_manager.register_asset_change(
            asset=asset, extra=extra, source_is_api=True, api_user_teams=set(), session=session
        )
        if event is None:
            return _error(503, f"asset {uri} could not record an event")
        body: dict[str, Any] = {
            "recorded": True,
            "asset_event_id": event.id,
            "asset_uri": uri,
            "source": extra["source"],
            "alertnames": extra["alertnames"],
            "fingerprints": extra["fingerprints"],
            "triggers": sorted(dag_id for dag_id, paused in consumers.items() if not paused),
        }
    paused = sorted(dag_id for dag_id, is_paused in consumers.items() if is_paused)
    if paused:
        body["paused"] = paused
        body["warning"] = f"{', '.join(paused)} paused: the event is recorded but starts no run while paused"
    log.info(
        "tuneloop alert from %s recorded asset event %s on %s (%d firing: %s)",
        extra["source"], body["asset_event_id"], uri, extra["firing"], ", ".join(extra["alertnames"]),
    )
    return JSONResponse(body, status_code=202)


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"recorded": False, "detail": detail}, status_code=status_code, headers=headers)


class TuneloopAlertsPlugin(AirflowPlugin):
    name = "tuneloop_alerts"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "tuneloop alert webhook"}]
