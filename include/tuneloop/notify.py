"""Messages on the loop's four events (drift, gate reject, deploy, rollback), sent through
Airflow's notifiers: Slack incoming webhook and SMTP email.

Building a message needs no Airflow: each ``*_message`` function turns the dict a step
returned (the task's XCom) into a :class:`Notification` with a title, the facts a person acts
on, and links. :func:`send_notification` hands it to the channels configured under ``notify``
in the settings; the notifiers themselves (the providers' ``SlackWebhookNotifier`` and
``SmtpNotifier``) come from ``tuneloop_airflow.notifiers``, outside this package. Both read Airflow connections
(``notify.slack_webhook_conn_id``, ``notify.smtp_conn_id``) defined the usual way, e.g.
``AIRFLOW_CONN_TUNELOOP_SLACK``.

A notification never fails the loop: a channel that cannot send is logged as a warning that
names the channel, its connection and the cause, and the task goes on.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from tuneloop.config import NotifySettings

log = logging.getLogger(__name__)

#: Longest fact line kept in a message (error texts can be long).
MAX_LINE = 600
#: At most this many reasons or endpoints are listed; the rest are counted.
MAX_ITEMS = 12
#: A Slack incoming-webhook URL: its path is the secret that lets anyone post to the channel.
SLACK_WEBHOOK_URL = re.compile(r"https?://hooks\.slack(?:-gov)?\.com/[^\s'\"<>|)\]}]*")
#: The logger tuneloop hands slack_sdk's WebhookClient, and the slack_sdk loggers that could
#: see the URL: each gets the redaction filter while tuneloop sends to Slack.
SLACK_LOGGER = "tuneloop.notify.slack"
SLACK_SDK_LOGGERS = ("slack_sdk", "slack_sdk.webhook.client", "slack_sdk.webhook.async_client", "slack_sdk.http_retry.builtin_handlers", "slack_sdk.proxy_env_variable_loader")


class SecretRedactor(logging.Filter):
    """Rewrites log records so that no Slack webhook URL, nor any URL registered with
    :meth:`add` (a webhook on another host), is in a message, its arguments or its traceback.
    slack_sdk logs the URL when it retries (``Going to retry the same request: POST <url>``)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 8:
            self.secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return SLACK_WEBHOOK_URL.sub("https://hooks.slack.com/***", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


REDACTOR = SecretRedactor()


def redact_slack_logs(*secrets: str | None) -> logging.Logger:
    """Install :data:`REDACTOR` on tuneloop's and slack_sdk's loggers (once) and register
    ``secrets`` (the webhook URL a connection resolved to); returns the logger to hand slack_sdk."""
    for secret in secrets:
        REDACTOR.add(secret)
    for name in (SLACK_LOGGER, __name__, *SLACK_SDK_LOGGERS):
        logger = logging.getLogger(name)
        if REDACTOR not in logger.filters:
            logger.addFilter(REDACTOR)
    return logging.getLogger(SLACK_LOGGER)


@dataclass(frozen=True)
class Notification:
    """One message: which event, a one-line title, fact lines and labelled links."""

    event: str
    title: str
    facts: tuple[str, ...] = ()
    links: tuple[tuple[str, str], ...] = ()
    data: dict[str, Any] = field(default_factory=dict)  # the numbers, for tests and logs

    def plain_text(self) -> str:
        lines = [self.title, *(f"- {fact}" for fact in self.facts)]
        lines += [f"{label}: {url}" for label, url in self.links]
        return "\n".join(lines)

    def slack_text(self) -> str:
        """Slack mrkdwn: bold title, bullet facts, ``<url|label>`` links (text escaped)."""
        lines = [f"*{_slack_escape(self.title)}*", *(f"• {_slack_escape(fact)}" for fact in self.facts)]
        if self.links:
            lines.append(" | ".join(f"<{url}|{_slack_escape(label)}>" for label, url in self.links))
        return "\n".join(lines)

    def html(self) -> str:
        """The email body: title, a list of facts, the links."""
        parts = [f"<h3>{html.escape(self.title, quote=False)}</h3>"]
        if self.facts:
            parts.append("<ul>" + "".join(f"<li>{html.escape(fact, quote=False)}</li>" for fact in self.facts) + "</ul>")
        if self.links:
            items = "".join(f'<li><a href="{html.escape(url, quote=True)}">{html.escape(label, quote=False)}</a></li>' for label, url in self.links)
            parts.append(f"<p>Links:</p><ul>{items}</ul>")
        parts.append("<p><small>tuneloop</small></p>")
        return "\n".join(parts)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: Any) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 1] + "…"


def _listed(items: Sequence[str]) -> list[str]:
    shown = [_clip(item) for item in items[:MAX_ITEMS]]
    if len(items) > MAX_ITEMS:
        shown.append(f"... and {len(items) - MAX_ITEMS} more")
    return shown


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _links(links: Mapping[str, str | Sequence[str] | None] | None) -> tuple[tuple[str, str], ...]:
    """Keep links a browser can open: for a list of locations (``Store.links``: URI first, then
    a presigned HTTPS URL) the HTTPS one if present, else the first."""
    kept = []
    for label, value in (links or {}).items():
        candidates = [value] if isinstance(value, str) else list(value or [])
        candidates = [c for c in candidates if c]
        if not candidates:
            continue
        https = [c for c in candidates if c.startswith("https://")]
        kept.append((label, https[0] if https else candidates[0]))
    return tuple(kept)


# --- the four events ----------------------------------------------------------------------


def drift_message(check: Mapping[str, Any], *, links: Mapping[str, Any] | None = None) -> Notification:
    """The drift monitor recorded a drift event (``steps: check_drift``'s result, emit=True)."""
    performance = check.get("performance") or {}
    facts = [
        f"decision: {_clip(check.get('decision', ''))}",
        f"statistic: {_num(check.get('statistic'), '.3f')} ({check.get('method', '?')}; 0.5 = no drift), p-value {_num(check.get('p_value'), '.3g')}",
        f"rows: {check.get('n_reference', '?')} reference ({_clip(check.get('reference', 'n/a'))}) vs {check.get('n_current', '?')} current",
    ]
    window = check.get("current_window") or []
    if window:
        facts.append(f"current window: {window[0]} .. {window[-1]}")
    facts.append(f"production: {check.get('production') or 'none'}; drifted checks in a row: {check.get('streak', '?')}")
    if performance.get("checked"):
        facts.append(
            f"performance: score change {_num(performance.get('delta'), '+.3f')}, p-value {_num(performance.get('p_value'), '.3g')}"
            f"{' (fell beyond the margin)' if performance.get('drift') else ''}"
        )
    terms = (check.get("report") or {}).get("top_terms") or check.get("top_terms") or []
    if terms:
        facts.append("top drifted terms: " + ", ".join(str(t.get("term", t)) if isinstance(t, dict) else str(t) for t in terms[:5]))
    return Notification(
        event="drift",
        title=f"Drift detected as of {check.get('as_of', '?')}: refresh requested",
        facts=tuple(facts),
        links=_links(links),
        data={k: check.get(k) for k in ("as_of", "statistic", "p_value", "method", "production")},
    )


def task_failure_message(*, dag_id: str, task_id: str, run_id: str, tries: int | None, error: BaseException | str | None) -> Notification:
    """A task of the loop's DAGs failed for good (after its last retry): which task, which run,
    the error; the task's log link is added by :func:`send_notification`."""
    cause = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (error or "unknown (see the task log)")
    facts = [f"run: {run_id}", f"tries: {tries}" if tries else "tries: ?", f"error: {_clip(REDACTOR.redact(str(cause)))}"]
    return Notification(
        event="task_failed",
        title=f"{dag_id}: task {task_id} failed",
        facts=tuple(facts),
        data={"dag_id": dag_id, "task_id": task_id, "run_id": run_id, "tries": tries},
    )


def store_links(loop: Any, key: str) -> list[str]:
    """Where a message's reader opens ``key`` (``Store.links``: URI, then on S3 an HTTPS link
    presigned for ``gate.report_link_hours``, 0: none). Under temporary credentials such a link
    carries their session token: it is left out unless ``gate.report_links_with_session_token``.
    For messages only: never log what this returns."""
    cfg = loop.settings.gate
    return list(loop.store.links(key, expires_s=int(cfg.report_link_hours * 3600), session_token=cfg.report_links_with_session_token))


def gate_report_links(loop: Any, decision: Mapping[str, Any]) -> dict[str, list[str]]:
    """Where to open a gate decision's report (``gate_step``'s ``report`` keys), for a message."""
    report = decision.get("report") or {}
    labels = {"html": "gate report (HTML)", "markdown": "gate report (Markdown)"}
    return {label: store_links(loop, report[kind]) for kind, label in labels.items() if report.get(kind)}


def drift_links(loop: Any) -> dict[str, list[str]]:
    """Where to open the drift history plot."""
    return {"drift history plot": store_links(loop, layout.DRIFT_HISTORY_PLOT)}


def gate_reject_message(decision: Mapping[str, Any], *, links: Mapping[str, Any] | None = None) -> Notification:
    """The eval gate rejected a candidate (``steps: gate_step``'s result, promote=False)."""
    version, baseline = decision.get("version", "?"), decision.get("baseline", "production")
    reasons = list(decision.get("reasons") or [])
    facts = [f"decision: REJECT {version} (compared with {baseline})"]
    facts += [f"reason: {reason}" for reason in _listed(reasons)]
    for name, numbers in sorted((decision.get("slices") or {}).items()):
        if isinstance(numbers, dict) and "delta" in numbers:
            verdict = "passed" if numbers.get("passed") else "FAILED"
            facts.append(
                f"slice {name} ({numbers.get('rule', '?')}, {verdict}): candidate - production {_num(numbers.get('delta'), '+.3f')}"
                f" CI [{_num(numbers.get('ci_low'), '+.3f')}, {_num(numbers.get('ci_high'), '+.3f')}], p {_num(numbers.get('p_value'), '.3g')}, n={numbers.get('n', '?')}"
            )
    report_links = dict(decision.get("report_links") or {})
    merged = {"gate report (HTML)": report_links.get("html"), "gate report (Markdown)": report_links.get("markdown"), **(links or {})}
    return Notification(
        event="gate_reject",
        title=f"Gate rejected candidate {version}: production stays {baseline}",
        facts=tuple(facts),
        links=_links(merged),
        data={"version": version, "baseline": baseline, "promote": False, "reasons": reasons},
    )


def approval_reject_message(review: Mapping[str, Any], *, links: Mapping[str, Any] | None = None) -> Notification | None:
    """A human rejected the gate's promotion in Required Actions, or nobody answered in time
    (``approval.record_review``'s result). It goes out as a ``gate_reject`` event: either way the
    candidate is not deployed. None for an approval (the deploy message follows)."""
    if review.get("decision") != "rejected":
        return None
    version, baseline = review.get("version", "?"), review.get("baseline") or "production"
    who = "nobody answered before the approval timeout (its default is Reject)" if review.get("timed_out") else f"rejected by {review.get('by') or 'an unnamed user'}"
    facts = [
        f"decision: REJECT {version} at human approval; the gate had passed it",
        f"why: {who}, at {review.get('at', '?')}",
        f"production stays {baseline}; nothing is deployed",
    ]
    return Notification(
        event="gate_reject",
        title=f"Approval rejected candidate {version}: production stays {baseline}",
        facts=tuple(facts),
        links=_links(links),
        data={"version": version, "baseline": baseline, "promote": False, "approval": "timed_out" if review.get("timed_out") else "rejected"},
    )


def review_links(loop: Any, review: Mapping[str, Any]) -> dict[str, list[str]]:
    """Where to open the gate report a human review answered (``Store.links``)."""
    key = review.get("gate_report")
    return {"gate report": store_links(loop, key)} if key else {}


def deploy_message(recorded: Mapping[str, Any], *, endpoints: Sequence[str], links: Mapping[str, Any] | None = None) -> Notification:
    """A candidate was hot-swapped, verified and recorded as production (``steps: record_step``)."""
    version = recorded.get("version", "?")
    aliases = recorded.get("aliases") or {}
    gate = recorded.get("gate") or {}
    facts = [
        f"production: {aliases.get('production', version)} (previous: {aliases.get('previous') or 'none'})",
        f"servers ({len(endpoints)}): " + ", ".join(_listed(list(endpoints))),
    ]
    facts += [f"gate: {reason}" for reason in _listed(list(gate.get("reasons") or []))]
    if recorded.get("at"):
        facts.append(f"recorded at {recorded['at']} by run {recorded.get('run_id', '?')}")
    return Notification(
        event="deploy",
        title=f"Deployed {version} to production",
        facts=tuple(facts),
        links=_links(links),
        data={"version": version, "previous": aliases.get("previous"), "endpoints": list(endpoints)},
    )


def rollback_message(result: Mapping[str, Any], *, requested: str, reason: str | None = None, links: Mapping[str, Any] | None = None) -> Notification:
    """A manual rollback served an earlier version again (``steps: rollback_step``)."""
    version, previous = result.get("version", "?"), result.get("from") or "none"
    endpoints = [str(ep.get("endpoint")) + f" ({ep.get('status')})" for ep in (result.get("deploy") or {}).get("endpoints") or []]
    facts = [
        f"production: {previous} → {version} (requested: {requested!r})",
        f"why: {_clip(reason or 'manual rollback')}",
    ]
    if endpoints:
        facts.append(f"servers ({len(endpoints)}): " + ", ".join(_listed(endpoints)))
    return Notification(
        event="rollback",
        title=f"Rolled back production: {previous} → {version}",
        facts=tuple(facts),
        links=_links(links),
        data={"version": version, "from": previous, "automatic": False},
    )


def deploy_rollback_message(report: Mapping[str, Any], *, version: str, links: Mapping[str, Any] | None = None) -> Notification | None:
    """A failed deploy restored the previous adapter on endpoints it had swapped (the automatic
    rollback in ``deploy.deploy_adapter``; ``report`` is its ``DeployReport.to_dict()``).
    None when no endpoint was swapped, i.e. nothing was rolled back. A gateway rollout's report
    (``rollout.RolloutReport.to_dict()``, ``serving.rollout: switch|canary``) is told as such."""
    if "strategy" in report:
        return _rollout_rollback_message(report, version=version, links=links)
    endpoints = list(report.get("endpoints") or [])
    touched = [ep for ep in endpoints if ep.get("status") in ("rolled_back", "rollback_failed")]
    if not touched:
        return None
    failed = [ep for ep in touched if ep.get("status") == "rollback_failed"]
    previous = report.get("previous_adapter_dir") or "no adapter (first deploy)"
    facts = [
        f"deploy of {version} failed at step {report.get('failed_step', '?')} on {report.get('failed_endpoint') or 'every endpoint'}",
        f"why: {_clip(report.get('error') or 'unknown error')}",
        f"restored: {previous}",
        "servers: " + ", ".join(_listed([f"{ep.get('endpoint')} ({ep.get('status')})" for ep in endpoints])),
    ]
    title = (
        f"ROLLBACK FAILED after the deploy of {version}: {len(failed)} server(s) may serve it"
        if failed
        else f"Deploy of {version} failed: rolled back to the previous adapter"
    )
    return Notification(
        event="rollback",
        title=title,
        facts=tuple(facts),
        links=_links(links),
        data={"version": version, "automatic": True, "rollback_failed": [ep.get("endpoint") for ep in failed]},
    )


def _rollout_rollback_message(report: Mapping[str, Any], *, version: str, links: Mapping[str, Any] | None) -> Notification | None:
    """A canary or switch whose bake (or a later step) failed: traffic went back by weights."""
    if not report.get("rolled_back"):
        return None
    previous = ", ".join(_listed([str(v) for v in (report.get("previous_routes") or {})])) or "no version"
    bakes = list(report.get("bakes") or [])
    facts = [
        f"{report.get('strategy')} rollout of {version} ({report.get('version_name')}) stopped at step {report.get('failed_step', '?')}",
        f"why: {_clip(report.get('error') or 'unknown error')}",
        f"traffic of {report.get('alias')} returned to: {previous}",
    ]
    if bakes:
        last = bakes[-1]
        candidate = last.get("candidate") or {}
        facts.append(
            f"last bake at {last.get('weight')}% of traffic for {last.get('seconds')} s: {candidate.get('requests')} requests, "
            f"{candidate.get('errors')} errors, {candidate.get('valid')} of {candidate.get('sampled')} sampled answers valid"
        )
    return Notification(
        event="rollback",
        title=f"Rollout of {version} rolled back: traffic returned to {previous}",
        facts=tuple(facts),
        links=_links(links),
        data={"version": version, "automatic": True, "strategy": report.get("strategy"), "step": report.get("failed_step")},
    )


def airflow_links(context: Mapping[str, Any] | None) -> dict[str, str]:
    """The task's log in the Airflow UI, when the task context can say where it is."""
    ti = (context or {}).get("ti")
    try:
        url = getattr(ti, "log_url", None)
    except Exception:  # the URL is a convenience; never let it cost the message
        url = None
    return {"Airflow task log": url} if isinstance(url, str) and url else {}


# --- sending ------------------------------------------------------------------------------


def channels(settings: NotifySettings) -> list[tuple[str, str]]:
    """The configured channels as ``(channel, connection id)``."""
    found = []
    if settings.slack_webhook_conn_id:
        found.append(("slack", settings.slack_webhook_conn_id))
    if settings.smtp_conn_id:
        found.append(("smtp", settings.smtp_conn_id))
    return found


def send_notification(
    settings: NotifySettings,
    message: Notification | None,
    *,
    context: Mapping[str, Any] | None = None,
    factories: Mapping[str, Callable[[NotifySettings, Notification], Any]],
) -> dict[str, str]:
    """Send ``message`` to every configured channel if its event is enabled; never raises.

    Returns ``{channel: "sent" | "failed: <cause>"}`` (empty when off or not subscribed).
    ``context`` (an Airflow task context) adds a link to the task's log. ``factories`` build a
    channel's notifier (``tuneloop_airflow.notifiers.FACTORIES``: Airflow's Slack and SMTP
    notifiers; tests pass their own), so this module never imports Airflow.
    """
    if message is None or message.event not in settings.events:
        return {}
    extra = [(label, url) for label, url in airflow_links(context).items() if label not in dict(message.links)]
    if extra:
        message = replace(message, links=(*message.links, *extra))
    build = dict(factories)
    outcome: dict[str, str] = {}
    for channel, conn_id in channels(settings):
        try:
            notifier = build[channel](settings, message)
            # notify(), not __call__: __call__ renders the text as a Jinja template, and a
            # gate reason or an error message may hold braces.
            notifier.notify(dict(context or {}))
        except Exception as err:
            cause = f"{type(err).__name__}: {_clip(REDACTOR.redact(str(err)))}"
            log.warning("notify: %s message for event %r not sent via %s (connection %r): %s", message.title, message.event, channel, conn_id, cause)
            outcome[channel] = f"failed: {cause}"
        else:
            log.info("notify: sent %r via %s (connection %r)", message.title, channel, conn_id)
            outcome[channel] = "sent"
    return outcome


def notify_task_event(
    open_loop: Callable[[], Any],
    build: Callable[[Any], Notification | None],
    *,
    context: Mapping[str, Any] | None,
    factories: Mapping[str, Callable[[NotifySettings, Notification], Any]],
) -> dict[str, str]:
    """Open the loop (``open_loop()``), build the message from it (``build(loop)``, which may read
    the store for links) and send it. Never raises: a notification must not fail the step that
    succeeded. Off (no channel): returns ``{}`` before building anything. The Airflow tasks call
    it through ``tuneloop_airflow.notify``, which supplies the task context and the notifiers."""
    try:
        loop = open_loop()
        settings = loop.settings.notify
        if not channels(settings):
            return {}
        message = build(loop)
    except Exception as err:
        log.warning("notify: no message sent: building it failed: %s: %s", type(err).__name__, _clip(err))
        return {"build": f"failed: {type(err).__name__}: {_clip(err)}"}
    return send_notification(settings, message, context=context, factories=factories)
