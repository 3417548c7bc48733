"""One deploy at a time per vLLM fleet: a lease in the store that every swap takes.

The refresh DAG's deploy, the rollback DAG, ``tuneloop deploy``/``rollback``/``reconcile`` and
the teardown's reconcile all change what the servers serve; two at once would each verify a
state the other is changing. Each takes the lease ``locks/fleet-<hash of the endpoints>.json``
with a conditional write (``put_if_absent``: one writer wins on S3 and on a local disk), holds
it for the swap, and deletes it after. The loser waits (polling) up to ``wait_s`` and then fails
with a message naming the holder. A lease carries an expiry, so a holder killed mid-swap (a
SIGKILLed worker) blocks the fleet for at most ``lease_s``; the same run may take its own
lease again (an Airflow retry of the task that held it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from tuneloop import layout

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from tuneloop.storage import Store

LEASE_S = 900.0
WAIT_S = 600.0
POLL_S = 2.0
_HELD: dict[tuple[str, str], dict[str, Any]] = {}  # (key, owner) held here: a nested take (rollback -> deploy) is a no-op


class FleetBusyError(RuntimeError):
    """Another deploy holds the fleet; the message names it and when its lease ends."""


def lock_key(endpoints: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(e.rstrip("/") for e in endpoints)).encode()).hexdigest()[:16]
    return layout.fleet_lock(digest)


def _now() -> datetime:
    return datetime.now(UTC)


@contextlib.contextmanager
def fleet_lock(
    store: Store,
    endpoints: Sequence[str],
    *,
    owner: str,
    action: str,
    lease_s: float = LEASE_S,
    wait_s: float = WAIT_S,
    poll_s: float = POLL_S,
    say: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Hold the fleet's lease for the ``with`` block (see the module docstring)."""
    key = lock_key(endpoints)
    if (key, owner) in _HELD:
        yield _HELD[(key, owner)]
        return
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        lease = {
            "owner": owner,
            "action": action,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "taken_at": _now().isoformat(timespec="seconds"),
            "expires_at": (_now() + timedelta(seconds=lease_s)).isoformat(timespec="seconds"),
            "endpoints": sorted(endpoints),
        }
        if store.put_if_absent(key, json.dumps(lease, indent=2).encode()):
            break
        holder = _read(store, key)
        if holder is None:
            continue  # released between our write and our read: try again at once
        if holder.get("owner") == owner or datetime.fromisoformat(holder["expires_at"]) < _now():
            why = "this run's own lease (a retry)" if holder.get("owner") == owner else f"an expired lease of {holder.get('owner')}"
            if say:
                say(f"fleet lock: taking over {why}")
            with contextlib.suppress(Exception):
                store.delete(key)
            continue
        if time.monotonic() >= deadline:
            raise FleetBusyError(
                f"another deploy holds the vLLM fleet ({holder.get('action')} by {holder.get('owner')} on {holder.get('host')}, "
                f"since {holder.get('taken_at')}, lease until {holder.get('expires_at')}); waited {wait_s:.0f} s. "
                f"Retry when it is done, or delete {store.uri}/{key} if that run is dead"
            )
        if say and not waited:
            say(f"fleet lock: waiting for {holder.get('action')} by {holder.get('owner')} (lease until {holder.get('expires_at')})")
        waited = True
        time.sleep(poll_s)
    _HELD[(key, owner)] = lease
    try:
        yield lease
    finally:
        del _HELD[(key, owner)]
        held = _read(store, key)
        if held is not None and held.get("owner") == owner and held.get("taken_at") == lease["taken_at"]:
            with contextlib.suppress(Exception):
                store.delete(key)


def _read(store: Store, key: str) -> dict[str, Any] | None:
    from tuneloop.storage import StoreKeyError

    try:
        value = store.get_json(key)
    except StoreKeyError:
        return None
    except ValueError:  # a torn or foreign file: treat it as expired
        return {"owner": "unreadable lease", "expires_at": "1970-01-01T00:00:00+00:00"}
    return value if isinstance(value, dict) and "expires_at" in value else {"owner": "unreadable lease", "expires_at": "1970-01-01T00:00:00+00:00"}
