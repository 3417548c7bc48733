"""De-duplication of alerts for the webhook (``alerts.py``): one refresh per alert and window,
shared by every API-server worker through a small JSON object in the store, written
generation by generation with a conditional put."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from tuneloop import layout
from tuneloop.alerts import _clip, _unique

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from tuneloop.alerts import Alert
    from tuneloop.storage import Store

T = TypeVar("T")


#: Generations kept behind the newest (for a reader that listed just before a write).
DEDUP_KEEP_GENERATIONS = 5
#: Entries kept at most (the newest claims); expired ones are dropped at every write.
DEDUP_MAX_ENTRIES = 1000
DEDUP_WRITE_ATTEMPTS = 8
_GENERATION_RE = re.compile(r"(\d+)\.json$")


class AlertDedupError(RuntimeError):
    """The de-duplication state could not be read or written; the message names the store and cause."""


def dedup_key(alert: Alert) -> str:
    """What makes two alerts the same: the ``fingerprint`` Alertmanager and Grafana send (a hash
    of the alert's labels, equal in every resend), else a hash of the labels computed here."""
    if alert.fingerprint:
        fingerprint = alert.fingerprint if len(alert.fingerprint) <= 64 else hashlib.sha256(alert.fingerprint.encode()).hexdigest()
        return f"fingerprint:{fingerprint}"
    labels = json.dumps(sorted(alert.labels.items()), ensure_ascii=False)
    return f"labels:{hashlib.sha256(labels.encode('utf-8')).hexdigest()[:32]}"


@dataclass(frozen=True)
class DedupResult:
    """The firing alerts of one call: those new in the window (claimed under ``claim``, they
    trigger a refresh) and the duplicates, each with the entry of the refresh it joined."""

    new: tuple[Alert, ...]
    duplicates: tuple[tuple[Alert, dict[str, Any]], ...] = ()
    claim: str | None = None


def _utcnow() -> datetime:
    return datetime.now(UTC)


class AlertDedup:
    """Which alerts triggered a refresh within the last ``window_s`` seconds.

    The state is one small JSON object in the store, ``alerts/dedup/<generation>.json``
    (:func:`tuneloop.layout.alert_dedup`): every change writes the next generation with a
    conditional put (``put_if_absent``), so of two API-server workers changing it at once one
    wins and the other re-reads and tries again: an alert is claimed once. Entries expire
    after the window and are dropped at the next write; old generations are deleted.
    """

    def __init__(
        self, store: Store, window_s: float, *, now: Callable[[], datetime] = _utcnow, max_entries: int = DEDUP_MAX_ENTRIES
    ) -> None:
        self.store = store
        self.window_s = window_s
        self._now = now
        self.max_entries = max_entries

    def claim(self, alerts: Iterable[Alert], *, source: str) -> DedupResult:
        """Claim the alerts not seen in the window; the rest are duplicates of earlier claims."""
        alerts = tuple(alerts)
        if self.window_s <= 0:
            return DedupResult(new=alerts)
        claim = uuid.uuid4().hex

        def change(entries: dict[str, dict[str, Any]]) -> tuple[DedupResult, bool]:
            now = self._now()
            new: list[Alert] = []
            duplicates: list[tuple[Alert, dict[str, Any]]] = []
            claimed: dict[str, dict[str, Any]] = {}
            for alert in alerts:
                key = dedup_key(alert)
                if key in entries:
                    duplicates.append((alert, {"key": key, **entries[key]}))
                elif key not in claimed:  # the same alert twice in one call counts once
                    new.append(alert)
                    claimed[key] = {
                        "alertname": _clip(alert.name, 128),
                        "source": source,
                        "claim": claim,
                        "claimed_at": now.isoformat(timespec="seconds"),
                        "expires_at": (now + timedelta(seconds=self.window_s)).isoformat(timespec="seconds"),
                        "asset_event_id": None,
                    }
            entries.update(claimed)
            return DedupResult(tuple(new), tuple(duplicates), claim if new else None), bool(claimed)

        return self._update(change)

    def attach_event(self, claim: str, asset_event_id: int) -> None:
        """Name the asset event a claim recorded, so a duplicate can say which refresh it joined."""
        self._rewrite_claim(claim, lambda entry: {**entry, "asset_event_id": asset_event_id})

    def release(self, claim: str) -> None:
        """Drop a claim whose event could not be recorded: the next resend may try again."""
        self._rewrite_claim(claim, lambda entry: None)

    def _rewrite_claim(self, claim: str, rewrite: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        def change(entries: dict[str, dict[str, Any]]) -> tuple[None, bool]:
            mine = [key for key, entry in entries.items() if entry.get("claim") == claim]
            for key in mine:
                replaced = rewrite(entries[key])
                if replaced is None:
                    del entries[key]
                else:
                    entries[key] = replaced
            return None, bool(mine)

        if self.window_s > 0:
            self._update(change)

    def _update(self, change: Callable[[dict[str, dict[str, Any]]], tuple[T, bool]]) -> T:
        """Read the newest state, apply ``change`` to its live entries, write the next generation."""
        from tuneloop.storage import StorageError, StoreKeyError

        for _ in range(DEDUP_WRITE_ATTEMPTS):
            try:
                generations = self._generations()
                newest = generations[-1] if generations else 0
                entries = self._live(self.store.get_json(layout.alert_dedup(newest))) if newest else {}
            except StoreKeyError:
                continue  # pruned between the listing and the read: a newer generation exists
            except StorageError as err:
                raise AlertDedupError(f"cannot read the alert de-duplication state in {self.store.uri}: {err}") from err
            result, changed = change(entries)
            if not changed:
                return result
            if len(entries) > self.max_entries:
                keep = sorted(entries, key=lambda key: str(entries[key].get("claimed_at")))[-self.max_entries :]
                entries = {key: entries[key] for key in keep}
            state = {"generation": newest + 1, "written_at": self._now().isoformat(timespec="seconds"), "entries": entries}
            try:
                written = self.store.put_if_absent(layout.alert_dedup(newest + 1), json.dumps(state, indent=1).encode())
            except StorageError as err:
                raise AlertDedupError(f"cannot write the alert de-duplication state in {self.store.uri}: {err}") from err
            if written:
                self._prune([g for g in generations if g <= newest + 1 - DEDUP_KEEP_GENERATIONS])
                return result
        raise AlertDedupError(
            f"the alert de-duplication state in {self.store.uri} changed under {DEDUP_WRITE_ATTEMPTS} attempts in a row "
            f"({layout.ALERT_DEDUP}/): too many webhook calls at once; the sender retries"
        )

    def _generations(self) -> list[int]:
        found = (_GENERATION_RE.search(key) for key in self.store.list(layout.ALERT_DEDUP))
        return sorted(int(match.group(1)) for match in found if match)

    def _live(self, state: Any) -> dict[str, dict[str, Any]]:
        """The state's entries that have not expired; a malformed state counts as empty."""
        entries = state.get("entries") if isinstance(state, dict) else None
        if not isinstance(entries, dict):
            return {}
        now = self._now()
        live: dict[str, dict[str, Any]] = {}
        for key, entry in entries.items():
            try:
                if datetime.fromisoformat(entry["expires_at"]) > now:
                    live[str(key)] = entry
            except (KeyError, TypeError, ValueError):
                continue
        return live

    def _prune(self, generations: Iterable[int]) -> None:
        for generation in generations:
            with contextlib.suppress(Exception):  # best effort: a later write prunes again
                self.store.delete(layout.alert_dedup(generation))


def duplicate_reason(duplicates: Iterable[tuple[Alert, dict[str, Any]]], window_s: float) -> str:
    """Why a call whose alerts were all seen in the window triggers nothing."""
    duplicates = tuple(duplicates)
    events = _unique(str(entry.get("asset_event_id")) for _, entry in duplicates if entry.get("asset_event_id") is not None)
    joined = f"asset event {', '.join(events)}" if events else "a refresh whose event is still being recorded"
    return (
        f"duplicate: {len(duplicates)} firing alert(s) already triggered a refresh in the last {window_s / 3600:g} h "
        f"(alerts.dedup_window_hours); joined {joined}"
    )
