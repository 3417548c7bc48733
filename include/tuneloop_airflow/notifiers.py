"""Airflow's notifiers for tuneloop's messages (see ``tuneloop.notify``): a Slack incoming
webhook and SMTP e-mail, each reading an Airflow connection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from tuneloop.config import NotifySettings
    from tuneloop.notify import Notification


#: Retries of one Slack message: a refused connection, a 429 whose Retry-After is short, a
#: 500/503; at most two in all (slack_sdk counts attempts across its handlers).
SLACK_RETRIES = 2
SLACK_MAX_RETRY_AFTER_S = 5


def slack_notifier(settings: NotifySettings, message: Notification) -> Any:
    """Airflow's Slack webhook notifier, with the webhook URL kept out of every log record:
    slack_sdk logs through a tuneloop logger with :data:`tuneloop.notify.REDACTOR` on it (the
    provider would hand it its own logger), and the provider's own line naming the URL after a
    send is not written."""
    from functools import cached_property

    from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
    from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier
    from slack_sdk.http_retry.builtin_handlers import (
        ConnectionErrorRetryHandler,
        RateLimitErrorRetryHandler,
        ServerErrorRetryHandler,
    )

    from tuneloop.notify import redact_slack_logs

    class ShortRateLimitRetry(RateLimitErrorRetryHandler):
        """Retry a 429 only when Slack asks to wait a few seconds: a notification must not hold the task."""

        def _can_retry(self, *, state: Any, request: Any, response: Any = None, error: Any = None) -> bool:
            waits = [v for k, v in (response.headers.items() if response is not None else []) if k.lower() == "retry-after"]
            try:
                wait = int(waits[0][0]) if waits else 1
            except (TypeError, ValueError, IndexError):
                return False
            return wait <= SLACK_MAX_RETRY_AFTER_S and super()._can_retry(state=state, request=request, response=response, error=error)

    class RedactedSlackWebhookNotifier(SlackWebhookNotifier):
        @cached_property
        def hook(self) -> SlackWebhookHook:
            return SlackWebhookHook(
                slack_webhook_conn_id=self.slack_webhook_conn_id,
                proxy=self.proxy,
                timeout=self.timeout,
                retry_handlers=self.retry_handlers,
                logger=redact_slack_logs(),
            )

        def notify(self, context: Any) -> None:
            redact_slack_logs(self.hook.client.url)  # whatever host the connection names
            self.hook.send(text=self.text, blocks=self.blocks, unfurl_links=self.unfurl_links, unfurl_media=self.unfurl_media, attachments=self.attachments)

    return RedactedSlackWebhookNotifier(
        slack_webhook_conn_id=settings.slack_webhook_conn_id or "",  # set: see notify.channels()
        text=message.slack_text(),
        timeout=settings.timeout_s,
        unfurl_links=False,
        retry_handlers=[
            ConnectionErrorRetryHandler(max_retry_count=SLACK_RETRIES),
            ShortRateLimitRetry(max_retry_count=SLACK_RETRIES),
            ServerErrorRetryHandler(max_retry_count=SLACK_RETRIES),
        ],
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
