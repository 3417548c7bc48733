"""Airflow's notifiers for tuneloop's messages (see ``tuneloop.notify``): a Slack incoming
webhook and SMTP e-mail, each reading an Airflow connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.config import NotifySettings
    from tuneloop.notify import Notification


def slack_notifier(settings: NotifySettings, message: Notification) -> Any:
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

    return SlackWebhookNotifier(
        slack_webhook_conn_id=settings.slack_webhook_conn_id or "",  # set: see notify.channels()
        text=message.slack_text(),
        timeout=settings.timeout_s,
        unfurl_links=False,
    )


def smtp_notifier(settings: NotifySettings, message: Notification) -> Any:
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    return SmtpNotifier(
        to=list(settings.email_to),
        from_email=settings.email_from,
        subject=f"{settings.subject_prefix} {message.title}".strip(),
        html_content=message.html(),
        smtp_conn_id=settings.smtp_conn_id,
    )


FACTORIES: dict[str, Callable[[NotifySettings, Notification], Any]] = {"slack": slack_notifier, "smtp": smtp_notifier}
