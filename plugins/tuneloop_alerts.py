"""Alert webhook for the Airflow API server: ``POST /tuneloop/alerts``; and the loops' state
for Prometheus at ``GET /tuneloop/metrics`` (same token; see ``tuneloop/metrics.py``).

A Prometheus Alertmanager or Grafana webhook that fires records an event on the drift asset
``tuneloop://loop/drift``, which triggers ``tuneloop_refresh``. Auth is a shared bearer token
(``$TUNELOOP_ALERT_TOKEN`` or the Variable ``tuneloop_alert_token``; none set: every call gets
503). Payload checks, the alert filter and the event's ``extra`` live in
``include/tuneloop/alerts.py``, with the rate limit, the body cap and the de-duplication (its
state in the store, so every API-server worker sees it); this file is the HTTP wiring, and it
records the event through Airflow's asset manager as ``POST /api/v2/assets/events`` does.

Answers: 202 ``{"recorded": true, "asset_event_id": ...}``; 200 ``{"recorded": false,
"reason": ...}`` (only resolved alerts, or none matches the filter), or ``{"recorded": false,
"duplicate": true, "joined": [{"asset_event_id", "dag_run_ids", ...}]}`` (every alert already
triggered a refresh within ``alerts.dedup_window_hours``); 400/413/422 ``{"detail"}`` for a
body we cannot read (413 as soon as it passes 1 MiB); 401 bad or missing token; 429 with
``Retry-After`` over ``alerts.rate_limit_*``; 503 no token configured, invalid settings, a
malformed ``TUNELOOP_ALERT_MATCH``, the de-duplication state unreadable, or the asset not parsed yet.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from tuneloop import alert_dedup, alerts, assets
from tuneloop.config import ConfigError

if TYPE_CHECKING:
    from tuneloop.config import AlertSettings, Settings
    from tuneloop.storage import Store

log = logging.getLogger(__name__)

URL_PREFIX = "/tuneloop"

app = FastAPI(
    title="tuneloop alerts",
    description="Alertmanager / Grafana webhooks that trigger a tuneloop refresh through the drift asset.",
)


@app.post("/alerts", status_code=202)
async def receive_alert(request: Request) -> JSONResponse:
    """Record a drift event for the new firing alerts of an Alertmanager or Grafana webhook."""
    refusal = await run_in_threadpool(_refuse_unauthorized, request.headers.get("authorization"))
    if refusal is not None:
        return refusal
    try:
        settings = await run_in_threadpool(alerts.webhook_settings, os.environ, _config_variable)
    except ConfigError as err:
        return _error(503, f"tuneloop settings invalid on the API server: {err}")
    wait_s = _rate_limiter(settings.alerts).acquire()
    if wait_s > 0:
        limit = settings.alerts
        log.warning("tuneloop alert refused: over the rate limit (%g/min, burst %d)", limit.rate_limit_per_minute, limit.rate_limit_burst)
        return _error(
            429,
            f"too many alert calls: at most {limit.rate_limit_per_minute:g} a minute (burst {limit.rate_limit_burst}, "
            "settings alerts.rate_limit_per_minute / alerts.rate_limit_burst); retry after the Retry-After seconds",
            {"Retry-After": alerts.retry_after(wait_s)},
        )
    try:
        alert_filter = alerts.AlertFilter.from_env(os.environ)
        body = await alerts.read_body(request.stream(), declared_length=request.headers.get("content-length"))
        notification = alerts.parse_notification(body)
    except alerts.AlertPayloadError as err:
        return _error(err.status_code, err.reason)
    except ValueError as err:  # a malformed filter in the server's environment
        return _error(503, f"alert filter misconfigured: {err}")
    decision = alerts.decide(notification, alert_filter)
    if not decision.record:
        log.info("tuneloop alert from %s not recorded: %s", notification.source, decision.reason)
        return JSONResponse({"recorded": False, "reason": decision.reason, "source": notification.source})
    return await run_in_threadpool(_record_new_alerts, settings, notification, decision.alerts)


@app.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """The loops' state for Prometheus (``tuneloop.metrics``): drift statistic and p-value,
    intake counts by reason, aliases, training speed, the gate's decision and deltas per slice;
    every sample labelled ``loop``. Same bearer token as the webhook (Prometheus:
    ``authorization: {credentials_file: ...}``). A loop whose store cannot be read reports
    ``tuneloop_loop_up 0``."""
    refusal = await run_in_threadpool(_refuse_unauthorized, request.headers.get("authorization"))
    if refusal is not None:
        return refusal
    from tuneloop import metrics

    return PlainTextResponse(await run_in_threadpool(_metrics_text), media_type=metrics.CONTENT_TYPE)


def _metrics_text() -> str:
    from tuneloop import metrics
    from tuneloop.config import load_settings
    from tuneloop.storage import open_store_from_settings

    families: list[metrics.Metric] = []
    loops_dir = os.environ.get("TUNELOOP_LOOPS_DIR")
    if loops_dir:
        from tuneloop_airflow.loops import loops_in

        settings_of = [(ref.id or "loop", lambda ref=ref: load_settings(ref.config)) for ref in loops_in(loops_dir)]
    else:
        settings_of = [("loop", lambda: alerts.webhook_settings(os.environ, _config_variable))]
    for loop_id, load in settings_of:
        try:
            settings = load()
            families += metrics.loop_metrics(loop_id, settings, open_store_from_settings(settings))
        except Exception as err:  # one loop's store down must not hide the others' metrics
            log.warning("tuneloop metrics: loop %s unreadable: %s: %s", loop_id, type(err).__name__, err)
            families += metrics.loop_down(loop_id)
    return metrics.render(families)


def _record_new_alerts(settings: Settings, notification: alerts.AlertNotification, firing: tuple[alerts.Alert, ...]) -> JSONResponse:
    """Claim the alerts not seen within the de-duplication window, record one event for them,
    and name the event (and runs) that the duplicates joined."""
    window_s = settings.alerts.dedup_window_hours * 3600
    try:
        dedup = alert_dedup.AlertDedup(_open_store(settings), window_s)
        claimed = dedup.claim(firing, source=notification.source)
    except Exception as err:  # the store: name the cause, and let the sender retry
        log.exception("tuneloop alert: de-duplication state unavailable")
        return _error(503, f"cannot check the alert against the ones already acted on: {type(err).__name__}: {err}")
    duplicates = _joined(claimed.duplicates)
    if not claimed.new:
        reason = alert_dedup.duplicate_reason(claimed.duplicates, window_s)
        log.info("tuneloop alert from %s not recorded: %s", notification.source, reason)
        return JSONResponse(
            {"recorded": False, "duplicate": True, "reason": reason, "source": notification.source, "joined": duplicates}
        )
    try:
        loop_id = alerts.loop_of(claimed.new, several_loops=bool(os.environ.get("TUNELOOP_LOOPS_DIR")))
    except alerts.AlertPayloadError as err:
        if claimed.claim is not None:
            dedup.release(claimed.claim)
        return _error(err.status_code, err.reason)
    status, body = _record_drift_event(alerts.drift_event_extra(notification, claimed.new), loop_id)
    if claimed.claim is not None:
        try:
            if body["recorded"]:
                dedup.attach_event(claimed.claim, body["asset_event_id"])
            else:
                dedup.release(claimed.claim)
        except Exception:  # the event stands; only the duplicate's answer loses its event id
            log.exception("tuneloop alert: cannot update the de-duplication state")
    if duplicates:
        body["duplicates"] = duplicates
    return JSONResponse(body, status_code=status)


def _joined(duplicates: tuple[tuple[alerts.Alert, dict[str, Any]], ...]) -> list[dict[str, Any]]:
    """Each earlier refresh the duplicates joined: its asset event, the runs that event started
    (none yet while the DAG is paused or the scheduler has not picked it up) and its window."""
    if not duplicates:
        return []
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    joined: dict[Any, dict[str, Any]] = {}
    for alert, entry in duplicates:
        event_id = entry.get("asset_event_id")
        item = joined.setdefault(
            event_id,
            {"asset_event_id": event_id, "dag_run_ids": [], "alertnames": [], "fingerprints": [], "claimed_at": entry.get("claimed_at"), "expires_at": entry.get("expires_at")},
        )
        if alert.name and alert.name not in item["alertnames"]:
            item["alertnames"].append(alert.name)
        item["fingerprints"].append(alert.fingerprint or entry["key"])
    event_ids = [event_id for event_id in joined if isinstance(event_id, int)]
    if event_ids:
        with create_session() as session:
            for event in session.scalars(select(AssetEvent).where(AssetEvent.id.in_(event_ids))):
                joined[event.id]["dag_run_ids"] = sorted(run.run_id for run in event.created_dagruns)
    return list(joined.values())


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


def _record_drift_event(extra: dict[str, Any], loop_id: str | None = None) -> tuple[int, dict[str, Any]]:
    """Record the event the way ``POST /api/v2/assets/events`` does: Airflow's asset manager
    queues every unpaused DAG scheduled on the asset, and the scheduler starts its run. With a
    loops folder, the asset is that loop's (``tuneloop://<id>/drift``)."""
    from airflow.assets.manager import asset_manager
    from airflow.models.asset import AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    name, uri = assets.for_loop(loop_id)["DRIFT"]
    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == name, AssetModel.uri == uri))
        if asset is None:
            return 503, {"recorded": False, "detail": f"asset {uri} is not registered yet: the DAG processor has not parsed tuneloop_refresh"}
        consumers = {ref.dag_id: bool(ref.dag.is_paused) for ref in asset.scheduled_dags}
        event = asset_manager.register_asset_change(
            asset=asset, extra=extra, source_is_api=True, api_user_teams=set(), session=session
        )
        if event is None:
            return 503, {"recorded": False, "detail": f"asset {uri} could not record an event"}
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
    return 202, body


_limiter: alerts.RateLimiter | None = None


def _rate_limiter(limits: AlertSettings) -> alerts.RateLimiter:
    """This worker's token bucket, made anew when the settings change."""
    global _limiter
    if _limiter is None or (_limiter.per_minute, _limiter.burst) != (limits.rate_limit_per_minute, limits.rate_limit_burst):
        _limiter = alerts.RateLimiter(limits.rate_limit_per_minute, limits.rate_limit_burst)
    return _limiter


def _open_store(settings: Settings) -> Store:
    from tuneloop.storage import open_store_from_settings

    return open_store_from_settings(settings)


def _config_variable() -> str | None:
    from airflow.models.variable import Variable

    return Variable.get("tuneloop_config", default_var=None)


def _error(status_code: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"recorded": False, "detail": detail}, status_code=status_code, headers=headers)


class TuneloopAlertsPlugin(AirflowPlugin):
    name = "tuneloop_alerts"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "tuneloop alert webhook and metrics"}]
