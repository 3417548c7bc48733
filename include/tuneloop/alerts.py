"""Alert webhooks -> a drift event: Prometheus Alertmanager and Grafana payloads, read and checked.

The Airflow plugin in ``plugins/tuneloop_alerts.py`` is the HTTP side; everything it decides
lives here, without Airflow, so it is unit-tested on its own:

1. :func:`check_bearer` compares the ``Authorization: Bearer`` header with the shared token
   (:func:`configured_token`: ``$TUNELOOP_ALERT_TOKEN``, else the Airflow Variable
   ``tuneloop_alert_token``) in constant time.
2. :class:`RateLimiter` (a token bucket, settings ``alerts.rate_limit_*``) answers 429 with a
   ``Retry-After`` to a caller over the rate.
3. :func:`read_body` reads the body incrementally and stops with 413 once it passes
   :data:`MAX_BODY_BYTES`; :func:`parse_notification` turns it into an :class:`AlertNotification`,
   or raises :class:`AlertPayloadError` with the HTTP status (400 bad JSON, 422 wrong shape).
4. :func:`decide` keeps the firing alerts that pass the :class:`AlertFilter`; resolved alerts
   never trigger a refresh.
5. :class:`AlertDedup` keeps an alert that triggered a refresh from triggering another within
   ``alerts.dedup_window_hours`` (state in the store, shared by every API-server worker).
6. :func:`drift_event_extra` is the event's ``extra``: source, alert names, fingerprints, a
   summary of labels and annotations, receiver and external URL, bounded in size.

Alertmanager (webhook ``version`` "4") and Grafana unified alerting (``orgId``, ``state``,
``title``, ``message``, webhook ``version`` "1") share the ``alerts`` list, each alert with
``status``, ``labels``, ``annotations``, ``startsAt``, ``fingerprint``.
"""

from __future__ import annotations

import enum
import hmac
import json
import logging
import math
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Callable, Iterable, Mapping

    from tuneloop.config import Settings

log = logging.getLogger(__name__)

TOKEN_ENV = "TUNELOOP_ALERT_TOKEN"
TOKEN_VARIABLE = "tuneloop_alert_token"
#: ``key=value`` pairs, comma-separated: an alert counts only if it carries every one of them.
MATCH_ENV = "TUNELOOP_ALERT_MATCH"
#: Comma-separated alert names: an alert counts only if its ``alertname`` is one of them.
NAMES_ENV = "TUNELOOP_ALERT_NAMES"

#: Bodies above this are refused (413) before parsing.
MAX_BODY_BYTES = 1024 * 1024
#: The event's ``extra`` (JSON) stays below this; per-alert details are dropped first.
EXTRA_MAX_BYTES = 8 * 1024
_MAX_TEXT = 256
_MAX_KEYS = 16
_MAX_DETAILED_ALERTS = 10
_MAX_NAMES = 20
_MAX_FINGERPRINTS = 50

ALERTMANAGER_VERSION = "4"
STATUSES = ("firing", "resolved")
Source = Literal["alertmanager", "grafana"]


class AlertPayloadError(ValueError):
    """The webhook body is not a payload we accept; ``status_code`` is 400 (not JSON) or 422."""

    def __init__(self, reason: str, status_code: int = 422) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status_code = status_code


class AuthOutcome(enum.Enum):
    """What the Authorization header amounts to; ``status_code`` is the HTTP answer to it."""

    OK = "ok"
    NOT_CONFIGURED = "not configured"
    MISSING = "missing bearer token"
    INVALID = "invalid bearer token"

    @property
    def status_code(self) -> int:
        return {"ok": 200, "not configured": 503}.get(self.value, 401)


NOT_CONFIGURED_MESSAGE = (
    "the alert endpoint has no token configured, so it refuses every call: set the environment "
    f"variable {TOKEN_ENV} on the Airflow API server (or create the Airflow Variable "
    f"{TOKEN_VARIABLE}) and send it as 'Authorization: Bearer <token>'"
)


def configured_token(env: Mapping[str, str], variable: Callable[[], str | None] | None = None) -> str | None:
    """The shared token: ``$TUNELOOP_ALERT_TOKEN`` first, else ``variable()`` (the Airflow
    Variable, read only when the environment has none). Blank counts as not configured."""
    token = (env.get(TOKEN_ENV) or "").strip()
    if not token and variable is not None:
        token = (variable() or "").strip()
    return token or None


def webhook_settings(env: Mapping[str, str], config_variable: Callable[[], str | None] | None = None) -> Settings:
    """The settings the webhook runs with (its ``alerts`` section, the store of its
    de-duplication state), chosen as the DAG tasks choose theirs: ``$TUNELOOP_CONFIG``, else
    ``config_variable()`` (the ``tuneloop_config`` Variable), with ``TUNELOOP__*`` overrides."""
    from tuneloop.config import choose_task_config, load_settings

    config, settings_env = choose_task_config(env, config_variable, lambda text: log.warning("tuneloop alerts: %s", text))
    return load_settings(config, env=settings_env)


def check_bearer(authorization: str | None, expected: str | None) -> AuthOutcome:
    """Check an ``Authorization`` header against the expected bearer token (constant time)."""
    if not expected:
        return AuthOutcome.NOT_CONFIGURED
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return AuthOutcome.MISSING
    if hmac.compare_digest(credentials.encode("utf-8"), expected.encode("utf-8")):
        return AuthOutcome.OK
    return AuthOutcome.INVALID


@dataclass(frozen=True)
class Alert:
    """One alert of a notification, as both senders describe it."""

    status: str
    labels: dict[str, str]
    annotations: dict[str, str]
    fingerprint: str | None = None
    starts_at: str | None = None
    generator_url: str | None = None

    @property
    def name(self) -> str:
        return self.labels.get("alertname", "")

    @property
    def firing(self) -> bool:
        return self.status == "firing"


@dataclass(frozen=True)
class AlertNotification:
    """One webhook call: a group of alerts and where it came from."""

    source: Source
    status: str | None
    alerts: tuple[Alert, ...]
    receiver: str | None = None
    external_url: str | None = None
    group_key: str | None = None
    common_labels: dict[str, str] = field(default_factory=dict)
    title: str | None = None
    truncated_alerts: int = 0

    @property
    def firing(self) -> tuple[Alert, ...]:
        return tuple(alert for alert in self.alerts if alert.firing)


def parse_notification(body: bytes | str) -> AlertNotification:
    """Parse a webhook body; :class:`AlertPayloadError` names what is wrong with it."""
    if isinstance(body, bytes):
        if len(body) > MAX_BODY_BYTES:
            raise AlertPayloadError(f"body is {len(body)} bytes, above the limit of {MAX_BODY_BYTES}", 413)
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as err:
            raise AlertPayloadError(f"body is not UTF-8: {err}", 400) from err
    if not body.strip():
        raise AlertPayloadError("body is empty: expected an Alertmanager or Grafana webhook JSON payload", 400)
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as err:
        raise AlertPayloadError(f"body is not valid JSON: {err}", 400) from err
    return notification_from_payload(payload)


def notification_from_payload(payload: Any) -> AlertNotification:
    """Check the shape of a decoded payload and read it into an :class:`AlertNotification`."""
    if not isinstance(payload, dict):
        raise AlertPayloadError(f"payload must be a JSON object, got {_json_type(payload)}")
    source = _source(payload)
    if "alerts" not in payload:
        hint = " (legacy Grafana alerting, before unified alerting, is not supported)" if source == "grafana" else ""
        raise AlertPayloadError(f"payload has no 'alerts' list: not an {source} webhook payload{hint}")
    raw_alerts = payload["alerts"]
    if not isinstance(raw_alerts, list):
        raise AlertPayloadError(f"'alerts' must be a list, got {_json_type(raw_alerts)}")
    if not raw_alerts:
        raise AlertPayloadError("'alerts' is empty: nothing to act on")
    alerts = tuple(_alert(raw, f"alerts[{index}]") for index, raw in enumerate(raw_alerts))
    status = payload.get("status")
    if status is not None and status not in STATUSES:
        raise AlertPayloadError(f"'status' must be one of {list(STATUSES)}, got {status!r}")
    truncated = payload.get("truncatedAlerts", 0)
    return AlertNotification(
        source=source,
        status=status,
        alerts=alerts,
        receiver=_optional_text(payload, "receiver"),
        external_url=_optional_text(payload, "externalURL"),
        group_key=_optional_text(payload, "groupKey"),
        common_labels=_string_map(payload.get("commonLabels"), "commonLabels"),
        title=_optional_text(payload, "title"),
        truncated_alerts=truncated if isinstance(truncated, int) and not isinstance(truncated, bool) else 0,
    )


def _source(payload: dict[str, Any]) -> Source:
    """Grafana adds ``orgId``/``state``/``title`` to Alertmanager's format; Alertmanager sends version 4."""
    if "orgId" in payload or "state" in payload:
        return "grafana"
    version = payload.get("version")
    if version is None:
        raise AlertPayloadError(
            "payload has no 'version' and no 'orgId': not an Alertmanager (version \"4\") or Grafana webhook payload"
        )
    if str(version) != ALERTMANAGER_VERSION:
        raise AlertPayloadError(f"unsupported Alertmanager webhook version {version!r}: expected \"{ALERTMANAGER_VERSION}\"")
    return "alertmanager"


def _alert(raw: Any, where: str) -> Alert:
    if not isinstance(raw, dict):
        raise AlertPayloadError(f"{where} must be an object, got {_json_type(raw)}")
    status = raw.get("status")
    if status not in STATUSES:
        raise AlertPayloadError(f"{where}.status must be one of {list(STATUSES)}, got {status!r}")
    if "labels" not in raw:
        raise AlertPayloadError(f"{where} has no 'labels'")
    return Alert(
        status=status,
        labels=_string_map(raw["labels"], f"{where}.labels"),
        annotations=_string_map(raw.get("annotations"), f"{where}.annotations"),
        fingerprint=_optional_text(raw, "fingerprint"),
        starts_at=_optional_text(raw, "startsAt"),
        generator_url=_optional_text(raw, "generatorURL"),
    )


def _string_map(value: Any, where: str) -> dict[str, str]:
    """Labels and annotations: an object of scalars (kept as strings); absent or null is empty."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AlertPayloadError(f"{where} must be an object, got {_json_type(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)):
            raise AlertPayloadError(f"{where}.{key} must be a string, got {_json_type(item)}")
        out[str(key)] = "" if item is None else str(item)
    return out


def _optional_text(mapping: dict[str, Any], key: str) -> str | None:
    value = mapping.get(key)
    return value if isinstance(value, str) and value else None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


@dataclass(frozen=True)
class AlertFilter:
    """Which firing alerts count. Empty (the default): every firing alert counts."""

    labels: dict[str, str] = field(default_factory=dict)
    names: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> AlertFilter:
        """``TUNELOOP_ALERT_MATCH="tuneloop=drift,team=ml"`` and ``TUNELOOP_ALERT_NAMES="A,B"``."""
        labels: dict[str, str] = {}
        for pair in _split(env.get(MATCH_ENV, "")):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{MATCH_ENV} must be comma-separated key=value pairs, got {pair!r}")
            labels[key.strip()] = value.strip()
        return cls(labels=labels, names=frozenset(_split(env.get(NAMES_ENV, ""))))

    def matches(self, alert: Alert) -> bool:
        if self.names and alert.name not in self.names:
            return False
        return all(alert.labels.get(key) == value for key, value in self.labels.items())

    def describe(self) -> str:
        parts = [f"{key}={value}" for key, value in sorted(self.labels.items())]
        if self.names:
            parts.append("alertname in " + "|".join(sorted(self.names)))
        return ", ".join(parts) or "none"


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@dataclass(frozen=True)
class DriftDecision:
    """Whether a notification records a drift event, why, and the alerts that made it."""

    record: bool
    reason: str
    alerts: tuple[Alert, ...] = ()


def decide(notification: AlertNotification, alert_filter: AlertFilter | None = None) -> DriftDecision:
    """Only firing alerts that pass the filter record an event; resolved ones never do."""
    alert_filter = alert_filter or AlertFilter()
    firing = notification.firing
    if not firing:
        return DriftDecision(
            False,
            f"no firing alert ({len(notification.alerts)} resolved): a resolved alert does not trigger a refresh",
        )
    matching = tuple(alert for alert in firing if alert_filter.matches(alert))
    if not matching:
        names = ", ".join(_unique(alert.name or "?" for alert in firing)[:5])
        return DriftDecision(
            False, f"none of the {len(firing)} firing alert(s) ({names}) matches the filter ({alert_filter.describe()})"
        )
    names = ", ".join(_unique(alert.name or "?" for alert in matching)[:5])
    return DriftDecision(True, f"{len(matching)} firing alert(s): {names}", matching)


LOOP_LABEL = "tuneloop_loop"
"""The alert label naming the loop a drift alert is for, when a loops folder defines several."""


def loop_of(alerts: Iterable[Alert], *, several_loops: bool) -> str | None:
    """The loop the alerts are for: their ``tuneloop_loop`` label (``None``: the single loop).
    With a loops folder every alert must carry it and all must agree (route per loop in
    Alertmanager: ``group_by: [tuneloop_loop]``); a loop id is lower-case letters, digits, ``_``."""

    named = {alert.labels.get(LOOP_LABEL) for alert in alerts}
    if len(named) > 1:
        shown = ", ".join(sorted(str(name) for name in named))
        raise AlertPayloadError(f"the alerts are for several loops ({shown}): send one notification per loop (Alertmanager: group_by: [{LOOP_LABEL}])")
    (loop,) = named or {None}
    if loop is None:
        if several_loops:
            raise AlertPayloadError(f"this Airflow runs several loops: label the alert with {LOOP_LABEL}=<loop id> (the name of its config file)")
        return None
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,39}", loop):
        raise AlertPayloadError(f"label {LOOP_LABEL}={loop[:60]!r} is no loop id (lower-case letters, digits, '_')")
    return loop


def drift_event_extra(notification: AlertNotification, alerts: Iterable[Alert], *, max_bytes: int = EXTRA_MAX_BYTES) -> dict[str, Any]:
    """The drift event's ``extra``: enough to tell which alert triggered the refresh, never
    more than ``max_bytes`` of JSON (per-alert details go first, then the longer lists)."""
    alerts = tuple(alerts)
    extra: dict[str, Any] = {
        "source": notification.source,
        "receiver": _clip(notification.receiver),
        "external_url": _clip(notification.external_url),
        "group_key": _clip(notification.group_key),
        "alertnames": [_clip(name) for name in _unique(alert.name for alert in alerts if alert.name)[:_MAX_NAMES]],
        "fingerprints": [_clip(f) for f in _unique(alert.fingerprint for alert in alerts if alert.fingerprint)[:_MAX_FINGERPRINTS]],
        "firing": len(alerts),
        "common_labels": _clip_map(notification.common_labels),
        "alerts": [
            {
                "name": _clip(alert.name),
                "fingerprint": _clip(alert.fingerprint),
                "starts_at": _clip(alert.starts_at),
                "labels": _clip_map(alert.labels),
                "annotations": _clip_map(alert.annotations),
            }
            for alert in alerts[:_MAX_DETAILED_ALERTS]
        ],
    }
    if notification.title:
        extra["title"] = _clip(notification.title)
    if notification.truncated_alerts:
        extra["truncated_alerts"] = notification.truncated_alerts
    while _size(extra) > max_bytes and extra["alerts"]:
        extra["alerts"].pop()
    for key in ("fingerprints", "alertnames"):
        while _size(extra) > max_bytes and len(extra[key]) > 1:
            extra[key] = extra[key][: len(extra[key]) // 2]
    if _size(extra) > max_bytes:
        extra["common_labels"] = {}
    extra["alerts_detailed"] = len(extra["alerts"])
    return extra


def _size(extra: Mapping[str, Any]) -> int:
    return len(json.dumps(extra, ensure_ascii=False).encode("utf-8"))


def _clip(text: str | None, limit: int = _MAX_TEXT) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def _clip_map(mapping: Mapping[str, str]) -> dict[str, str]:
    return {str(_clip(key, 64)): str(_clip(value)) for key, value in sorted(mapping.items())[:_MAX_KEYS]}


def _unique(items: Iterable[str | None]) -> list[str]:
    return list(dict.fromkeys(item for item in items if item))


# --- reading the body: never more than the cap ----------------------------------------------


async def read_body(chunks: AsyncIterable[bytes], *, declared_length: str | None = None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, read chunk by chunk. A declared ``Content-Length`` over ``limit`` is
    refused before reading; a body that grows past ``limit`` (chunked transfer, or a length
    the server did not check) is refused at the chunk that crosses it, so no client can make
    the server read or hold more than ``limit`` bytes of it."""
    declared = (declared_length or "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise AlertPayloadError(f"body is {declared} bytes, above the limit of {limit}", 413)
    received = bytearray()
    async for chunk in chunks:
        received += chunk
        if len(received) > limit:
            raise AlertPayloadError(f"body passed the limit of {limit} bytes (stopped reading at {len(received)})", 413)
    return bytes(received)


# --- rate limit -----------------------------------------------------------------------------


class RateLimiter:
    """A token bucket: ``burst`` calls at once, then ``per_minute`` calls a minute. It lives in
    the memory of one API-server worker process, so N workers take at most N times the rate."""

    def __init__(self, per_minute: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_minute <= 0 or burst < 1:
            raise ValueError(f"rate limit needs per_minute > 0 and burst >= 1, got {per_minute} and {burst}")
        self.per_minute = per_minute
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take a token: 0.0 when the call may go ahead, else the seconds until a token is free
        (the call is refused and takes nothing)."""
        with self._lock:
            now = self._clock()
            rate = self.per_minute / 60.0
            self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._updated) * rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / rate


def retry_after(wait_s: float) -> str:
    """The ``Retry-After`` header for a wait: whole seconds, at least 1."""
    return str(max(1, math.ceil(wait_s)))
