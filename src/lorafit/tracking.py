"""Experiment tracking in MLflow: one MLflow run per lorafit run, and its lineage.

``train`` opens the MLflow run and records its id in ``run.json``; ``eval``, ``merge`` and
``export`` find it there (a merged model points back to its run through
``lorafit_merge.json``) and log to the same run, so one MLflow run shows
dataset -> adapter -> merged model -> GGUF -> evaluation.

Store: ``tracking.uri`` in the config, else ``$MLFLOW_TRACKING_URI``, else a local sqlite file
``runs/mlflow.db`` (no server; artifacts in ``runs/mlartifacts``). Tracking never stops a run:
the first failure (store unreachable, disk, ...) is reported once and tracking goes quiet.

Credentials in a tracking URI (``user:password@``, tokens in the query) are never written or
printed: run.json, MLflow params, ``lorafit runs`` and logs get ``redact_uri``'s form. A command
that reads a run directory logs to the store the user configured for it (``--store``,
``$MLFLOW_TRACKING_URI`` or the default), and only when that is the store the run names: a run
directory someone else wrote cannot send lorafit to a server of its choosing.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

log = logging.getLogger(__name__)
_SECRET_KEY = re.compile(r"token|key|secret|pass|auth|sig|cred|session", re.IGNORECASE)


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without credentials: the user info and the values of secret-looking query keys
    become ``***``."""
    if not uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "***"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_KEY.search(k) for k, _ in pairs):
        query = urlencode([(k, "***" if _SECRET_KEY.search(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # nothing secret; urlunsplit would also turn sqlite://// into sqlite://
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, uri: str | None) -> str:
    """``text`` (an error message) without the secrets of ``uri``, in whatever form a library
    quoted them: the URI itself, its user info, its password, its secret query values."""
    if not uri:
        return text
    text = text.replace(uri, redact_uri(uri) or "")
    try:
        parts = urlsplit(uri)
    except ValueError:
        return text
    secrets = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        secrets += [userinfo, *userinfo.split(":", 1)]
    secrets += [v for k, v in parse_qsl(parts.query) if _SECRET_KEY.search(k)]
    for secret in sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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
            message = redact_text(str(e), self.uri)
            log.warning(
                "MLflow tracking is off for the rest of this run (%s failed: %s)", what, message
            )
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


_SAID: set[tuple[str, str]] = set()  # (run, store) pairs already explained in this process


def tracker_for_run(run_dir: str | Path, store: str | None = None) -> Tracker | None:
    """The MLflow run a lorafit run directory was tracked in, opened in the store the user
    configured (``store``, else $MLFLOW_TRACKING_URI, else the default); None when the run
    was not tracked there."""
    from lorafit.rundir import RunDir

    run = RunDir(run_dir)
    if not run.info_file.is_file():
        return None
    tracking = run.info().get("tracking") or {}
    if not tracking.get("run_id"):
        return None
    uri = tracking_uri(store)
    if redact_uri(uri) != tracking.get("uri"):
        if (str(run_dir), uri) in _SAID:
            return None
        _SAID.add((str(run_dir), uri))
        log.info(
            "%s was tracked in %s, not in this command's store %s: its results are not logged "
            "there (pass --store or set MLFLOW_TRACKING_URI to that store to log them)",
            run_dir,
            tracking.get("uri"),
            redact_uri(uri),
        )
        return None
    return Tracker(uri, tracking.get("experiment", EXPERIMENT)).attach(tracking["run_id"])


def tracker_for_model(model_dir: str | Path, store: str | None = None) -> Tracker | None:
    """For a run dir, or a merged model that records the run it came from."""
    from lorafit.rundir import MERGE_INFO, read_json

    path = Path(model_dir)
    if (path / MERGE_INFO).is_file():
        run = read_json(path / MERGE_INFO).get("run")
        return tracker_for_run(run, store) if run else None
    return tracker_for_run(path, store)


def start_training_run(config, run, record, resume: bool) -> Tracker:
    """Open (or, on --resume, reopen) a training run's MLflow run and log what it is made of:
    the config as params, dataset hashes and counts, versions, device and precision."""
    t = config.tracking
    tracker = Tracker(tracking_uri(t.uri), t.experiment, enabled=t.enabled)
    if not t.enabled:
        return tracker
    previous = {}
    if resume and run.info_file.is_file():
        previous = run.info().get("tracking") or {}
    if previous.get("run_id") and previous.get("uri") == redact_uri(tracker.uri):
        tracker.attach(previous["run_id"])
    else:
        # `lorafit demo` names every run dir "run": qualify it with the demo's directory
        target = run.target.resolve()
        name = target.name if target.name != "run" else f"{target.parent.name}-run"
        tracker.start(
            name, {"lorafit.run_dir": str(target), "lorafit.base_model": config.model.name}
        )
    if tracker.run_id:
        record.update(
            tracking={
                "uri": redact_uri(tracker.uri),
                "experiment": tracker.experiment,
                "run_id": tracker.run_id,
            }
        )
    tracker.log_params(flatten(config_for_the_record(config)))
    tracker.log_params(flatten({"dataset": record.info["data"]}))
    tracker.set_tags({f"version.{k}": v for k, v in record.info["versions"].items()})
    tracker.set_tags(
        {"lorafit.device": record.info["device"], "lorafit.precision": record.info["precision"]}
    )
    return tracker


def config_without_secrets(config):
    """The config as written to a run directory (config.yaml) or MLflow: the tracking URI
    without its credentials. A run directory gets copied and shared; ``--resume`` reads the
    user's own config, so nothing needs them back from it."""
    tracking = config.tracking.model_copy(update={"uri": redact_uri(config.tracking.uri)})
    return config.model_copy(update={"tracking": tracking})


def config_for_the_record(config) -> dict[str, Any]:
    return config_without_secrets(config).model_dump(mode="json")


# --- reading the store ------------------------------------------------------------------


def _store(uri: str):
    """A client for reading ``uri``; a store that cannot be read is one clear error."""
    from mlflow.tracking import MlflowClient

    from lorafit.errors import LorafitError

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - unreachable server, bad URI, broken sqlite file
        reason = redact_text(str(e), uri).splitlines()[0][:200]
        raise LorafitError(
            f"cannot read the tracking store {redact_uri(uri)} ({type(e).__name__}: {reason}); "
            "check --store / MLFLOW_TRACKING_URI"
        ) from None
    return client


def list_runs(uri: str, limit: int = 20, experiment: str = EXPERIMENT) -> list[dict[str, Any]]:
    """Runs of the store, best held-out accuracy first (untested runs last, newest first)."""
    client = _store(uri)
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
    from lorafit.errors import LorafitError

    client = _store(uri)
    if Path(ref).is_dir():
        tracker = tracker_for_run(ref)
        if tracker and tracker.run_id:
            return client.get_run(tracker.run_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            if ref in (run.info.run_id, run.info.run_name):
                return run
    raise LorafitError(f"no run named {ref!r} in {redact_uri(uri)} (see `lorafit runs`)")


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
