"""Experiment tracking: each refresh is one MLflow run, so a team sees the loop's work where it
already looks. Off until ``tracking.mlflow: true``; then ``tracking.uri`` (any MLflow tracking
URI), or by default a SQLite store in the work dir that ``make mlflow`` opens in MLflow's UI.

One run per refresh, found again by every task of it through the tag ``tuneloop.run_key`` (its
name is the DAG run id):

- ``validate`` (:meth:`Tracker.log_snapshot`): the dataset snapshot as an MLflow dataset input
  (its hash as digest, its store URI as source), intake counts and quarantine reasons;
- ``train`` (:meth:`Tracker.log_training`): the base model (and its hash) and training settings
  as params, the loss and eval-loss curves per logged step, tokens/s and time; the resolved
  settings (secrets masked) and the adapter's provenance record as files;
- ``gate`` (:meth:`Tracker.log_gate`): per slice the candidate's and production's means, the
  delta and its interval, whether it passed; the decision; the gate report as artifacts;
- ``record`` and rollbacks (:meth:`Tracker.mirror_aliases`): the registry's aliases mirrored on
  a registered model (``tracking.registered_model``), one model version per adapter version,
  its source the adapter in the store. The run ends (FINISHED) at the record, or at a gate that
  rejects; a task that fails for good ends it FAILED.

The loop never fails because of tracking: the first call that fails (server down, a bad URI,
mlflow not installed) logs one warning naming the cause, and tracking is off for the rest of
the process. MLflow's own HTTP retries are cut to none, with a 5 s timeout, so a dead server
costs seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from tuneloop.config import Settings
    from tuneloop.storage import Store

log = logging.getLogger(__name__)

RUN_KEY_TAG = "tuneloop.run_key"
VERSION_TAG = "tuneloop.version"
_FAILED: set[str] = set()  # tracking URIs that failed in this process: tracking is off for them
_KEY_CHARS = re.compile(r"[^\w\-. /]")


def default_uri(settings: Settings) -> str:
    return f"sqlite:///{(Path(settings.work_dir) / 'mlflow.db').resolve()}"


def _key(text: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, _ - . / and spaces)."""
    return _KEY_CHARS.sub("_", text)[:250]


def _safe_uri(uri: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", uri)  # user:password@host


class Tracker:
    """The MLflow run of one refresh (``run_key``); every method is a no-op after a failure."""

    def __init__(self, settings: Settings, *, run_key: str, run_name: str, store: Store) -> None:
        cfg = settings.tracking
        self.uri = cfg.uri or default_uri(settings)
        task = settings.task.name or "task"
        self.experiment = cfg.experiment or f"tuneloop/{task}"
        self.model_name = cfg.registered_model or _key(f"tuneloop-{task}").replace(" ", "-").replace("/", "-")
        self.run_key, self.run_name, self.store = run_key, run_name, store
        self.settings = settings
        self._client: Any = None
        self._run_id: str | None = None

    # --- plumbing ----------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``, or None with one warning per process and URI if anything fails."""
        if self.uri in _FAILED:
            return None
        try:
            if self._client is None:
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
                from mlflow.tracking import MlflowClient

                if self.uri.startswith("sqlite:///"):
                    Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return fn(self._client)
        except Exception as err:  # noqa: BLE001 - tracking must never fail the loop
            _FAILED.add(self.uri)
            cause = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            log.warning("tracking: %s not logged to MLflow at %s (%s); MLflow tracking is off for the rest of this task", what, _safe_uri(self.uri), cause)
            return None

    def _artifacts(self) -> str | None:
        """Beside a SQLite store: ``mlflow-artifacts/`` next to the database (MLflow's default,
        ``./mlruns``, would follow each worker's current directory). A server keeps its own."""
        if self.uri.startswith("sqlite:///"):
            return (Path(self.uri.removeprefix("sqlite:///")).parent / "mlflow-artifacts").as_uri()
        return None

    def run_id(self, client: Any) -> str:
        """This refresh's run: found by its tag (another task of the refresh made it) or made."""
        if self._run_id is not None:
            return self._run_id
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment, artifact_location=self._artifacts())
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1)
        if found:
            self._run_id = str(found[0].info.run_id)
        else:
            tags = {RUN_KEY_TAG: self.run_key, "tuneloop.store": self.store.uri, "tuneloop.task": self.settings.task.name}
            self._run_id = str(client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id)
        return self._run_id

    def _log(self, client: Any, *, metrics: Mapping[str, Any] = {}, params: Mapping[str, Any] = {}, tags: Mapping[str, Any] = {}, steps: Mapping[str, list[tuple[int, float]]] = {}) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        entries = [Metric(_key(k), float(v), now, 0) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)]
        entries += [Metric(_key(k), float(v), now, int(step)) for k, series in steps.items() for step, v in series]
        run_id = self.run_id(client)
        for start in range(0, max(len(entries), 1), 1000):  # MLflow takes at most 1000 metrics a batch
            client.log_batch(
                run_id,
                metrics=entries[start : start + 1000],
                params=[Param(_key(k), str(v)[:6000]) for k, v in params.items()] if start == 0 else [],
                tags=[RunTag(_key(k), str(v)[:5000]) for k, v in tags.items()] if start == 0 else [],
            )

    # --- what the steps log ------------------------------------------------------------

    def log_snapshot(self, result: Mapping[str, Any]) -> None:
        """``validate_step``'s result: the snapshot as the run's training dataset, the counts."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        snapshot = str(result["snapshot"])
        counts = result.get("counts") or {}

        def log(client: Any) -> None:
            source = json.dumps({"uri": f"{self.store.uri}/snapshots/{snapshot}", "partitions": result.get("partitions")})
            dataset = Dataset(name=f"snapshot-{snapshot[:12]}", digest=snapshot[:32], source_type="tuneloop", source=source, profile=json.dumps(counts))
            client.log_inputs(self.run_id(client), datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])])
            metrics = {f"data.{name}": value for name, value in counts.items()}
            metrics |= {f"data.quarantined.{reason}": n for reason, n in (result.get("reasons") or {}).items()}
            self._log(client, metrics=metrics, params={"data.snapshot": snapshot}, tags={"tuneloop.snapshot": snapshot})

        self._call("the dataset snapshot", log)

    def log_training(
        self, result: Mapping[str, Any], *, loss_history: list[float], eval_loss_history: list[Any], provenance: Mapping[str, Any] | None = None
    ) -> None:
        """``train_step``'s result and the trainer's curves; the resolved settings (secrets
        masked) and the adapter's provenance record (base model hash, package versions) as files."""
        training = self.settings.training.model_dump(mode="json")
        params = {f"training.{name}": value for name, value in training.items() if not isinstance(value, dict | list)}
        params |= {"model.base_model": self.settings.model.base_model, "train.version": result.get("version"), "train.init_from": result.get("init_from") or "none"}
        if provenance and provenance.get("base_model_hash"):
            params["model.base_model_hash"] = provenance["base_model_hash"]
        metrics = {f"train.{name}": result.get(name) for name in ("final_loss", "tokens_per_second", "seconds", "steps", "epochs", "trainable_params")}
        eval_points = [(int(point[0]), float(point[1])) for point in eval_loss_history if isinstance(point, list | tuple) and len(point) == 2]
        steps = {"train.loss": [(i, float(loss)) for i, loss in enumerate(loss_history, 1)], "train.eval_loss": eval_points}
        tags = {"tuneloop.version": result.get("version"), "tuneloop.adapter": result.get("adapter_uri")}

        def log(client: Any) -> None:
            self._log(client, metrics=metrics, params=params, tags=tags, steps=steps)
            client.log_dict(self.run_id(client), self.settings.model_dump(mode="json"), "config.json")  # SecretStr fields dump masked
            if provenance:
                client.log_dict(self.run_id(client), dict(provenance), "provenance.json")

        self._call("the training run", log)

    def log_gate(self, decision: Mapping[str, Any]) -> None:
        """``gate_step``'s result: per-slice statistics, the decision, the report files."""
        metrics: dict[str, Any] = {"gate.promote": 1.0 if decision.get("promote") else 0.0}
        for name, found in (decision.get("slices") or {}).items():
            for field in ("candidate_mean", "baseline_mean", "delta", "ci_low", "ci_high", "p_value", "n"):
                metrics[f"gate.{name}.{field}"] = found.get(field)
            metrics[f"gate.{name}.passed"] = 1.0 if found.get("passed") else 0.0
        tags = {"tuneloop.gate": "promote" if decision.get("promote") else "reject", "tuneloop.gate_reasons": "; ".join(decision.get("reasons") or []) or "none"}

        def log(client: Any) -> None:
            self._log(client, metrics=metrics, params={"gate.baseline": decision.get("baseline")}, tags=tags)
            with tempfile.TemporaryDirectory(prefix="tuneloop-mlflow-") as folder:
                report = decision.get("report") or {}
                keys = [key for value in report.values() for key in (value.values() if isinstance(value, dict) else [value])]
                for key in keys:
                    if isinstance(key, str) and self.store.exists(key):
                        path = Path(folder) / Path(key).name
                        self.store.get_file(key, path)
                        client.log_artifact(self.run_id(client), str(path), artifact_path="gate_report")

        self._call("the gate decision", log)

    def mirror_aliases(self, aliases: Mapping[str, str | None], records: Mapping[str, Mapping[str, Any]]) -> None:
        """The registry's aliases on the registered model: each adapter version one model
        version (tag ``tuneloop.version``), each alias pointing where the registry's does."""

        def mirror(client: Any) -> None:
            from mlflow.exceptions import MlflowException

            try:
                client.get_registered_model(self.model_name)
            except MlflowException:
                client.create_registered_model(self.model_name, description="tuneloop's adapters; aliases mirror tuneloop's registry")
            existing = {mv.tags.get(VERSION_TAG): mv.version for mv in client.search_model_versions(f"name = '{self.model_name}'")}
            for alias, version in aliases.items():
                if not version:
                    try:
                        client.delete_registered_model_alias(self.model_name, alias)
                    except MlflowException:
                        pass
                    continue
                if version not in existing:
                    record = records.get(version) or {}
                    source = f"{self.store.uri}/{record.get('adapter_key') or f'adapters/{version}'}"
                    run_id = self.run_id(client) if record.get("run_id") == self.run_name else None
                    created = client.create_model_version(self.model_name, source, run_id=run_id, tags={VERSION_TAG: version}, description=f"adapter {version}")
                    existing[version] = created.version
                client.set_registered_model_alias(self.model_name, alias, existing[version])

        self._call("the registry aliases", mirror)


    def finish(self, status: str = "FINISHED") -> None:
        """End this refresh's run (the last step it reaches: the record, a rejecting gate)."""
        self._call("the end of the run", lambda client: client.set_terminated(self.run_id(client), status=status))


def tracker_for(settings: Settings, *, run_key: str, run_name: str, store: Store) -> Tracker | None:
    """The refresh's tracker, or None when tracking is off."""
    return Tracker(settings, run_key=run_key, run_name=run_name, store=store) if settings.tracking.mlflow else None
