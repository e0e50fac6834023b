"""Experiment tracking in MLflow: one MLflow run per lorafit run, and its lineage.

``train`` opens the MLflow run and records its id in ``run.json``; ``eval``, ``merge`` and
``export`` find it there (a merged model points back to its run through
``lorafit_merge.json``) and log to the same run, so one MLflow run shows
dataset -> adapter -> merged model -> GGUF -> evaluation.

Store: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else a local sqlite file
``runs/mlflow.db`` (no server; artifacts in ``runs/mlartifacts``). Tracking never stops a run:
the first failure (store unreachable, disk, ...) is reported once and tracking goes quiet.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_STORE = Path("runs") / "mlflow.db"
EXPERIMENT = "lorafit"
PARAM_MAX = 6000  # MLflow's limit on a param value


def tracking_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{DEFAULT_STORE.resolve()}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it (not in ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """A thin, failure-proof handle on one MLflow run (every call is a no-op once disabled)."""

    def __init__(self, uri: str, experiment: str = EXPERIMENT, enabled: bool = True):
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self.run_id: str | None = None
        self._client = None

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # tracking must never kill the run it tracks
            self.enabled = False
            log.warning("MLflow tracking is off for the rest of this run (%s failed: %s)", what, e)
            return None

    def _connect(self):
        # fail fast instead of retrying for minutes when a remote store is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    @property
    def client(self):
        return self._client or self._connect()

    def start(self, run_name: str, tags: dict[str, str]) -> str | None:
        def _start():
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else self.client.create_experiment(
                    self.experiment, artifact_location=_artifact_root(self.uri)
                )
            )
            return self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

        self.run_id = self._call("starting the MLflow run", _start)
        return self.run_id

    def attach(self, run_id: str) -> Tracker:
        self.run_id = run_id
        self._call("reopening the MLflow run", lambda: self.client.get_run(run_id))
        return self

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        def _log():
            existing = self.client.get_run(self.run_id).data.params
            fresh = [
                Param(k, str(v)[:PARAM_MAX]) for k, v in params.items() if k not in existing
            ]  # a resumed run keeps its params; MLflow refuses to change one
            for i in range(0, len(fresh), 100):
                self.client.log_batch(self.run_id, params=fresh[i : i + 100])

        if self.run_id:
            self._call("logging params", _log)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        if self.run_id and rows:
            self._call("logging metrics", self.client.log_batch, self.run_id, metrics=rows)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        rows = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        if self.run_id and rows:
            self._call("setting tags", self.client.log_batch, self.run_id, tags=rows)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not (self.run_id and path.exists()):
            return
        if path.is_dir():
            self._call(
                "logging artifacts",
                self.client.log_artifacts,
                self.run_id,
                str(path),
                artifact_path,
            )
        else:
            self._call(
                "logging an artifact",
                self.client.log_artifact,
                self.run_id,
                str(path),
                artifact_path,
            )

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id:
            self._call("closing the run", self.client.set_terminated, self.run_id, status)


def tracker_for_run(run_dir: str | Path) -> Tracker | None:
    """The MLflow run a lorafit run directory was tracked in (None when it was not)."""
    from lorafit.rundir import RUN_FILE, read_json

    info_file = Path(run_dir) / RUN_FILE
    if not info_file.is_file():
        return None
    tracking = read_json(info_file).get("tracking") or {}
    if not tracking.get("run_id"):
        return None
    return Tracker(tracking["uri"], tracking.get("experiment", EXPERIMENT)).attach(
        tracking["run_id"]
    )


def tracker_for_model(model_dir: str | Path) -> Tracker | None:
    """For a run dir, or a merged model that records the run it came from."""
    from lorafit.rundir import read_json

    path = Path(model_dir)
    if (path / "lorafit_merge.json").is_file():
        run = read_json(path / "lorafit_merge.json").get("run")
        return tracker_for_run(run) if run else None
    return tracker_for_run(path)


# --- reading the store ------------------------------------------------------------------


def list_runs(uri: str, limit: int = 20, experiment: str = EXPERIMENT) -> list[dict[str, Any]]:
    """Runs of the store, best held-out accuracy first (untested runs last, newest first)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["start_time DESC"])
    rows = [_summary(r) for r in runs]
    rows.sort(key=lambda r: (r["heldout_accuracy"] is None, -(r["heldout_accuracy"] or 0)))
    return rows[:limit]


def _summary(run) -> dict[str, Any]:
    params, metrics = run.data.params, run.data.metrics
    end = run.info.end_time
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "base_model": params.get("model.name"),
        "data": Path(params.get("data.train") or "?").name,
        "heldout_accuracy": metrics.get("heldout_accuracy"),
        "base_accuracy": metrics.get("eval.base.accuracy"),
        "final_loss": metrics.get("final_loss"),
        "duration_s": (end - run.info.start_time) / 1000 if end else None,
        "run_dir": run.data.tags.get("lorafit.run_dir"),
    }


def find_run(uri: str, ref: str, experiment: str = EXPERIMENT):
    """A run by MLflow id, run name, or lorafit run directory."""
    from mlflow.tracking import MlflowClient

    from lorafit.errors import LorafitError

    client = MlflowClient(tracking_uri=uri)
    if Path(ref).is_dir():
        tracker = tracker_for_run(ref)
        if tracker and tracker.run_id:
            return client.get_run(tracker.run_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            if ref in (run.info.run_id, run.info.run_name):
                return run
    raise LorafitError(f"no run named {ref!r} in {uri} (see `lorafit runs`)")


def compare_runs(uri: str, a: str, b: str) -> dict[str, Any]:
    run_a, run_b = find_run(uri, a), find_run(uri, b)
    pa, pb = run_a.data.params, run_b.data.params
    params = {
        k: (pa.get(k), pb.get(k)) for k in sorted(set(pa) | set(pb)) if pa.get(k) != pb.get(k)
    }
    ma, mb = run_a.data.metrics, run_b.data.metrics
    keys = [
        k
        for k in (
            "heldout_accuracy",
            "eval.base.accuracy",
            "eval.tuned.rouge_l",
            "eval.tuned.stop_rate",
            "eval.tuned.general_accuracy",
            "final_loss",
            "final_eval_loss",
            "tokens_per_s",
            "train_runtime_s",
        )
        if k in ma or k in mb
    ]
    return {
        "names": (run_a.info.run_name, run_b.info.run_name),
        "params": params,
        "metrics": {k: (ma.get(k), mb.get(k)) for k in keys},
    }
