"""The Airflow-facing side of tuneloop, beside the plain package (which never imports Airflow).

What a DAG task needs beyond a ``tuneloop.steps`` function: the loop opened from the
``tuneloop_config`` Variable and the ``tuneloop_vllm`` connection (:func:`task_loop`), domain
errors that no retry can fix turned into Airflow failures without retry (:func:`no_retry_on`),
notifications with the task's context (:func:`notify`), the task bodies the DAG files wire
(:mod:`tuneloop_airflow.tasks`), the human-approval operator (:mod:`tuneloop_airflow.approval`)
and the failure alert every task carries (:func:`on_task_failure`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tuneloop.notify import Notification
    from tuneloop.steps.loop import Loop, StoreConnection

CONFIG_VARIABLE = "tuneloop_config"
VLLM_CONNECTION = "tuneloop_vllm"
log = logging.getLogger("airflow.task")


def vllm_connection() -> Any:
    """The vLLM connection of the running task's loop (``tuneloop_vllm``, or ``tuneloop_vllm_<id>``
    for a loop of a loops folder: vLLM endpoints and API key), or None if not defined."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from tuneloop_airflow.loops import CURRENT

    try:
        return Connection.get(CURRENT.get().vllm_connection)
    except AirflowNotFoundException:
        return None


def store_connection(conn_id: str) -> StoreConnection | None:
    """The AWS connection ``conn_id`` (``store.aws_conn_id``) as the store's keys, region and
    endpoint, read through the amazon provider's hook as its own operators do (so role
    assumption and the other connection extras work too); None if the connection does not exist."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from tuneloop.steps.loop import StoreConnection

    try:
        Connection.get(conn_id)
    except AirflowNotFoundException:
        return None
    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    session = hook.get_session()
    found = session.get_credentials()
    frozen = found.get_frozen_credentials() if found is not None else None
    return StoreConnection(
        access_key_id=frozen.access_key if frozen else None,
        secret_access_key=frozen.secret_key if frozen else None,
        session_token=frozen.token if frozen else None,
        region=session.region_name,
        endpoint_url=hook.conn_config.endpoint_url,
    )


def task_loop(run_id: str | None = None) -> Loop:
    """The loop for the running task: config from ``$TUNELOOP_CONFIG``, else the
    ``tuneloop_config`` Variable, else the embedded defaults; vLLM endpoints and key from the
    ``tuneloop_vllm`` connection and an s3:// store's credentials from the AWS connection
    ``store.aws_conn_id`` (``tuneloop_store``) when they exist; progress into the task log.
    ``run_id``: the DAG run's (default: the running task context's)."""
    from airflow.sdk import Variable, get_current_context

    from tuneloop.steps.loop import open_task_loop
    from tuneloop_airflow.loops import CURRENT

    return open_task_loop(
        run_id or get_current_context()["run_id"],
        config_variable=lambda: Variable.get(CONFIG_VARIABLE, default=None),
        progress=log.info,
        vllm_connection=vllm_connection,
        store_connection=store_connection,
        config_path=CURRENT.get().config,
    )


@contextlib.contextmanager
def no_retry_on(*errors: type[BaseException]) -> Iterator[None]:
    """Fail the task without retries on ``errors`` (bad data, no new data: a retry gives the
    same answer); the message keeps the numbers the error carries."""
    from airflow.sdk.exceptions import AirflowFailException

    try:
        yield
    except errors as err:
        raise AirflowFailException(str(err)) from err


def notify(build: Callable[[Loop], Notification | None], *, loop: Loop | None = None, context: Any = None) -> dict[str, str]:
    """Send the message ``build(loop)`` to the configured channels; never raises."""
    from airflow.sdk import get_current_context

    from tuneloop.notify import notify_task_event
    from tuneloop_airflow.notifiers import FACTORIES

    if context is None:
        with contextlib.suppress(Exception):
            context = get_current_context()
    return notify_task_event((lambda: loop) if loop is not None else task_loop, build, context=context, factories=FACTORIES)


def on_task_failure(context: Any) -> None:
    """``on_failure_callback`` of every task of the loop's DAGs: Airflow calls it once, when a
    task fails after its last retry (a retry calls ``on_retry_callback``), so one message per
    failed try sequence, naming the DAG, task, run and error, with the task's log link.
    Never raises (a callback error would only add noise to the failure)."""
    from tuneloop.notify import task_failure_message

    try:
        ti = context.get("ti")
        dag_id = getattr(ti, "dag_id", None) or str(context.get("dag_id") or "?")
        task_id = getattr(ti, "task_id", None) or "?"
        run_id = str(context.get("run_id") or getattr(ti, "run_id", "?"))
        tries = getattr(ti, "try_number", None)
        error = context.get("exception")
        loop = task_loop(run_id)
        notify(lambda _loop: task_failure_message(dag_id=dag_id, task_id=task_id, run_id=run_id, tries=tries, error=error), loop=loop, context=context)
        if loop.tracker is not None and dag_id.endswith("refresh"):
            loop.tracker.finish("FAILED")
    except Exception as err:  # noqa: BLE001 - never turn a failure alert into a second failure
        log.warning("notify: no task-failure message sent: %s: %s", type(err).__name__, err)
