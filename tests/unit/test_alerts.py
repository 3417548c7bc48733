"""Alert webhooks: the token check, the payloads Alertmanager and Grafana send, the filter, and
the drift event's extra. No Airflow: the plugin's HTTP side is tested in
tests/integration/test_alert_endpoint.py against a running API server."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tuneloop.alerts import (
    EXTRA_MAX_BYTES,
    MAX_BODY_BYTES,
    AlertFilter,
    AlertPayloadError,
    AuthOutcome,
    check_bearer,
    configured_token,
    decide,
    drift_event_extra,
    notification_from_payload,
    parse_notification,
)

pytestmark = pytest.mark.unit


def alertmanager_payload(*statuses: str, **labels: str) -> dict[str, Any]:
    """What Alertmanager's webhook receiver posts (version 4), one alert per status."""
    alerts = [
        {
            "status": status,
            "labels": {"alertname": "TuneloopTrafficDrift", "severity": "page", **labels, "instance": f"vllm-{i}"},
            "annotations": {"summary": f"traffic drifted on vllm-{i}", "runbook_url": "https://runbooks/drift"},
            "startsAt": "2026-11-02T09:51:03.157Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus:9090/graph?g0.expr=drift",
            "fingerprint": f"fp{i:014x}",
        }
        for i, status in enumerate(statuses or ("firing",))
    ]
    return {
        "version": "4",
        "groupKey": '{}:{alertname="TuneloopTrafficDrift"}',
        "truncatedAlerts": 0,
        "status": "firing" if "firing" in (statuses or ("firing",)) else "resolved",
        "receiver": "tuneloop-refresh",
        "groupLabels": {"alertname": "TuneloopTrafficDrift"},
        "commonLabels": {"alertname": "TuneloopTrafficDrift", "severity": "page"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": alerts,
    }


def grafana_payload(status: str = "firing") -> dict[str, Any]:
    """What a Grafana unified-alerting webhook contact point posts."""
    return {
        "receiver": "tuneloop",
        "status": status,
        "orgId": 1,
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "Answer quality dropped", "grafana_folder": "ML", "tuneloop": "drift"},
                "annotations": {"summary": "field accuracy below 0.8 for 1h"},
                "startsAt": "2026-11-02T09:51:03.157076+02:00",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "https://grafana/alerting/grafana/abc/view",
                "fingerprint": "c6eadffa33fcdf37",
                "silenceURL": "https://grafana/alerting/silence/new",
                "dashboardURL": "",
                "panelURL": "",
                "values": {"B": 0.74, "C": 1},
                "valueString": "[ var='B' labels={} value=0.74 ]",
            }
        ],
        "groupLabels": {"alertname": "Answer quality dropped"},
        "commonLabels": {"alertname": "Answer quality dropped", "tuneloop": "drift"},
        "commonAnnotations": {},
        "externalURL": "https://grafana/",
        "version": "1",
        "groupKey": '{}/{tuneloop="drift"}:{alertname="Answer quality dropped"}',
        "truncatedAlerts": 0,
        "title": "[FIRING:1] Answer quality dropped ML",
        "state": "alerting",
        "message": "**Firing**\n\nValue: B=0.74",
    }


# --- token ---------------------------------------------------------------------------------


def test_token_from_env_wins_over_the_variable_and_blank_is_not_configured() -> None:
    looked_up: list[bool] = []

    def variable() -> str:
        looked_up.append(True)
        return "from-variable"

    assert configured_token({"TUNELOOP_ALERT_TOKEN": " s3cret "}, variable) == "s3cret"
    assert looked_up == []
    assert configured_token({}, variable) == "from-variable"
    assert configured_token({"TUNELOOP_ALERT_TOKEN": "  "}, lambda: None) is None
    assert configured_token({}, lambda: "") is None
    assert configured_token({}) is None


@pytest.mark.parametrize(
    ("header", "expected", "outcome"),
    [
        ("Bearer s3cret", "s3cret", AuthOutcome.OK),
        ("bearer   s3cret  ", "s3cret", AuthOutcome.OK),
        ("Bearer s3cret", None, AuthOutcome.NOT_CONFIGURED),
        (None, None, AuthOutcome.NOT_CONFIGURED),
        (None, "s3cret", AuthOutcome.MISSING),
        ("", "s3cret", AuthOutcome.MISSING),
        ("Bearer", "s3cret", AuthOutcome.MISSING),
        ("Basic dXNlcjpzM2NyZXQ=", "s3cret", AuthOutcome.MISSING),
        ("s3cret", "s3cret", AuthOutcome.MISSING),
        ("Bearer s3cre", "s3cret", AuthOutcome.INVALID),
        ("Bearer s3cret2", "s3cret", AuthOutcome.INVALID),
        ("Bearer sécret", "s3cret", AuthOutcome.INVALID),
    ],
)
def test_check_bearer(header: str | None, expected: str | None, outcome: AuthOutcome) -> None:
    assert check_bearer(header, expected) is outcome


def test_auth_outcomes_are_distinct_and_map_to_http_statuses() -> None:
    assert len(set(AuthOutcome)) == 4
    assert AuthOutcome.NOT_CONFIGURED.status_code == 503
    assert AuthOutcome.MISSING.status_code == AuthOutcome.INVALID.status_code == 401
    assert check_bearer("Bearer wrong", "s3cret") is not AuthOutcome.MISSING


# --- payloads ------------------------------------------------------------------------------


def test_alertmanager_payload_is_read() -> None:
    notification = parse_notification(json.dumps(alertmanager_payload("firing", "resolved")).encode())
    assert notification.source == "alertmanager"
    assert notification.status == "firing"
    assert notification.receiver == "tuneloop-refresh"
    assert notification.external_url == "http://alertmanager:9093"
    assert [a.status for a in notification.alerts] == ["firing", "resolved"]
    assert [a.fingerprint for a in notification.firing] == ["fp00000000000000"]
    assert notification.alerts[0].name == "TuneloopTrafficDrift"
    assert notification.alerts[0].annotations["summary"] == "traffic drifted on vllm-0"


def test_grafana_payload_is_read() -> None:
    notification = parse_notification(json.dumps(grafana_payload()))
    assert notification.source == "grafana"
    assert notification.title == "[FIRING:1] Answer quality dropped ML"
    assert notification.alerts[0].name == "Answer quality dropped"
    assert notification.alerts[0].fingerprint == "c6eadffa33fcdf37"


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b"", 400, "body is empty"),
        (b"{not json", 400, "not valid JSON"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[1, 2]", 422, "must be a JSON object, got a list"),
        (b'"firing"', 422, "must be a JSON object, got a string"),
        (b'{"status": "firing"}', 422, "no 'version' and no 'orgId'"),
        (b'{"version": "3", "alerts": []}', 422, "unsupported Alertmanager webhook version '3'"),
        (b'{"version": "4"}', 422, "no 'alerts' list"),
        (b'{"orgId": 1, "state": "alerting", "evalMatches": []}', 422, "legacy Grafana"),
        (b'{"version": "4", "alerts": {}}', 422, "'alerts' must be a list, got an object"),
        (b'{"version": "4", "alerts": []}', 422, "'alerts' is empty"),
        (b'{"version": "4", "alerts": [1]}', 422, "alerts[0] must be an object, got a number"),
        (b'{"version": "4", "alerts": [{"status": "pending", "labels": {}}]}', 422, "alerts[0].status must be one of ['firing', 'resolved'], got 'pending'"),
        (b'{"version": "4", "alerts": [{"status": "firing"}]}', 422, "alerts[0] has no 'labels'"),
        (b'{"version": "4", "alerts": [{"status": "firing", "labels": ["a"]}]}', 422, "alerts[0].labels must be an object, got a list"),
        (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"a": {"b": 1}}}]}', 422, "alerts[0].labels.a must be a string"),
        (b'{"version": "4", "status": "ok", "alerts": [{"status": "firing", "labels": {}}]}', 422, "'status' must be one of"),
    ],
)
def test_bad_payloads_name_the_reason(body: bytes, status: int, reason: str) -> None:
    with pytest.raises(AlertPayloadError) as caught:
        parse_notification(body)
    assert caught.value.status_code == status
    assert reason in caught.value.reason


def test_oversized_body_is_refused_before_parsing() -> None:
    with pytest.raises(AlertPayloadError) as caught:
        parse_notification(b" " * (MAX_BODY_BYTES + 1))
    assert caught.value.status_code == 413


def test_scalar_labels_are_kept_as_strings() -> None:
    payload = alertmanager_payload()
    payload["alerts"][0]["labels"].update({"replicas": 3, "canary": True, "empty": None})
    labels = notification_from_payload(payload).alerts[0].labels
    assert (labels["replicas"], labels["canary"], labels["empty"]) == ("3", "True", "")


# --- decision and filter -------------------------------------------------------------------


def test_only_firing_alerts_record_an_event() -> None:
    resolved = decide(notification_from_payload(alertmanager_payload("resolved", "resolved")))
    assert resolved.record is False
    assert "no firing alert (2 resolved)" in resolved.reason
    mixed = decide(notification_from_payload(alertmanager_payload("resolved", "firing")))
    assert mixed.record is True
    assert [a.fingerprint for a in mixed.alerts] == ["fp00000000000001"]


def test_filter_from_env() -> None:
    alert_filter = AlertFilter.from_env({"TUNELOOP_ALERT_MATCH": "tuneloop=drift, team = ml", "TUNELOOP_ALERT_NAMES": "A, B,"})
    assert alert_filter.labels == {"tuneloop": "drift", "team": "ml"}
    assert alert_filter.names == {"A", "B"}
    assert AlertFilter.from_env({}) == AlertFilter()
    with pytest.raises(ValueError, match="key=value"):
        AlertFilter.from_env({"TUNELOOP_ALERT_MATCH": "tuneloop"})


def test_filter_keeps_only_matching_firing_alerts() -> None:
    payload = alertmanager_payload("firing", "firing")
    payload["alerts"][1]["labels"]["tuneloop"] = "drift"
    notification = notification_from_payload(payload)

    by_label = decide(notification, AlertFilter(labels={"tuneloop": "drift"}))
    assert by_label.record and [a.fingerprint for a in by_label.alerts] == ["fp00000000000001"]

    by_name = decide(notification, AlertFilter(names=frozenset({"Other"})))
    assert by_name.record is False
    assert "none of the 2 firing alert(s) (TuneloopTrafficDrift)" in by_name.reason
    assert "alertname in Other" in by_name.reason

    assert decide(notification_from_payload(grafana_payload()), AlertFilter(labels={"tuneloop": "drift"})).record


# --- the event's extra ---------------------------------------------------------------------


def test_extra_carries_source_names_fingerprints_and_receiver() -> None:
    notification = notification_from_payload(alertmanager_payload("firing", "resolved", "firing"))
    decision = decide(notification)
    extra = drift_event_extra(notification, decision.alerts)
    assert extra["source"] == "alertmanager"
    assert extra["alertnames"] == ["TuneloopTrafficDrift"]
    assert extra["fingerprints"] == ["fp00000000000000", "fp00000000000002"]
    assert extra["receiver"] == "tuneloop-refresh"
    assert extra["external_url"] == "http://alertmanager:9093"
    assert extra["firing"] == 2 and extra["alerts_detailed"] == 2
    assert extra["alerts"][1]["labels"]["instance"] == "vllm-2"
    assert extra["alerts"][0]["annotations"]["summary"] == "traffic drifted on vllm-0"
    json.dumps(extra)  # an asset event's extra must be JSON

    grafana = notification_from_payload(grafana_payload())
    grafana_extra = drift_event_extra(grafana, decide(grafana).alerts)
    assert grafana_extra["source"] == "grafana"
    assert grafana_extra["title"] == "[FIRING:1] Answer quality dropped ML"


def test_extra_is_bounded_for_huge_notifications() -> None:
    payload = alertmanager_payload()
    template = payload["alerts"][0]
    payload["alerts"] = []
    for i in range(500):
        alert = copy.deepcopy(template)
        alert["fingerprint"] = f"{i:016x}"
        alert["labels"] = {"alertname": f"Drift{i}", **{f"label{k}": "x" * 1000 for k in range(40)}}
        alert["annotations"] = {"description": "y" * 100_000}
        payload["alerts"].append(alert)
    notification = notification_from_payload(payload)
    extra = drift_event_extra(notification, decide(notification).alerts)
    assert len(json.dumps(extra, ensure_ascii=False).encode()) <= EXTRA_MAX_BYTES
    assert extra["firing"] == 500
    assert extra["alertnames"][0] == "Drift0" and extra["fingerprints"][0] == "0000000000000000"
    assert extra["alerts_detailed"] == len(extra["alerts"]) < 10
    for detail in extra["alerts"]:
        assert len(detail["labels"]) <= 16
        assert all(len(value) <= 256 for value in detail["labels"].values())
