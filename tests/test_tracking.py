"""MLflow tracking, checked by querying the store through MLflow's own client: a tiny run's
params, per-step metrics, artifacts and lineage (eval, merge); `lorafit runs`; and a store that
is down never stops training."""

import os

import pytest
from conftest import run_cli
from mlflow.tracking import MlflowClient
from test_train import _cfg

from lorafit.config import EvalSection
from lorafit.evaluate import evaluate
from lorafit.merge import merge
from lorafit.rundir import read_json
from lorafit.train import train


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("tracked")
    first = train(_cfg(tmp, tiny_model_dir, out="lr-high"), show_progress=False)
    second = train(
        _cfg(tmp, tiny_model_dir, out="lr-low", **{"train.lr": 1e-2}), show_progress=False
    )
    evaluate(
        first, tmp / "eval.jsonl", settings=EvalSection(limit=4, max_new_tokens=8), probes=None
    )
    merge(first, tmp / "merged")
    return tmp, first, second


def _run(run_dir):
    tracking = read_json(run_dir / "run.json")["tracking"]
    assert tracking["uri"] == os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=tracking["uri"])
    return client, client.get_run(tracking["run_id"])


def test_train_logs_params_metrics_and_artifacts(tracked):
    _, first, _ = tracked
    client, run = _run(first)
    assert run.info.status == "FINISHED" and run.info.run_name == "lr-high"
    params = run.data.params
    assert params["lora.r"] == "4" and params["train.lr"] == "0.05"
    assert params["model.name"].endswith("tiny-llama0")
    assert len(params["dataset.train.sha256"]) == 64 and params["dataset.train.rows"] == "8"
    assert run.data.tags["version.torch"].startswith("2.13")
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == list(range(1, 21))  # every logged step
    assert client.get_metric_history(run.info.run_id, "eval_loss")
    assert run.data.metrics["tokens_per_s"] > 0 and "final_loss" in run.data.metrics
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "config.yaml", "run.json", "metrics.jsonl", "adapter"} <= files
    adapter = {f.path for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter


def test_eval_and_merge_join_the_training_run(tracked):
    tmp, first, _ = tracked
    client, run = _run(first)
    metrics = run.data.metrics
    assert {"heldout_accuracy", "eval.base.accuracy", "eval.tuned.rouge_l"} <= set(metrics)
    assert metrics["merge.max_abs_logit_diff"] <= 1e-3
    assert run.data.tags["lorafit.merged_dir"] == str((tmp / "merged").resolve())
    evals = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/report.html", "eval/metrics.json", "eval/predictions.jsonl"} <= evals
    assert (first / "eval" / "report.html").read_text().startswith("<!doctype html>")


def test_runs_table_and_compare(tracked):
    _, first, second = tracked
    r = run_cli("runs", "--limit", "50")
    assert r.returncode == 0, r.stderr
    assert "lr-high" in r.stdout and "lr-low" in r.stdout
    # the evaluated run ranks first (best held-out accuracy first, unevaluated last)
    assert r.stdout.index("lr-high") < r.stdout.index("lr-low")
    r = run_cli("runs", "compare", str(first), "lr-low")
    assert r.returncode == 0, r.stderr
    assert "train.lr" in r.stdout and "0.05" in r.stdout and "0.01" in r.stdout
    r = run_cli("runs", "compare", "lr-high", "no-such-run")
    assert r.returncode == 2 and "no run named" in r.stderr


def test_a_store_that_is_down_never_stops_training(tmp_path, tiny_model_dir, caplog):
    cfg = _cfg(
        tmp_path,
        tiny_model_dir,
        **{"tracking.uri": "http://127.0.0.1:9", "train.max_steps": 2, "train.eval_steps": 2},
    )
    run_dir = train(cfg, show_progress=False)
    info = read_json(run_dir / "run.json")
    assert info["status"] == "completed" and "tracking" not in info
    warnings = [r for r in caplog.records if "MLflow tracking is off" in r.getMessage()]
    assert len(warnings) == 1  # said once, not at every step


def test_tracking_can_be_turned_off(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, **{"tracking.enabled": False, "train.max_steps": 2})
    run_dir = train(cfg, show_progress=False)
    assert "tracking" not in read_json(run_dir / "run.json")


def test_default_store_is_runs_mlflow_db_beside_the_runs(tmp_path, tiny_model_dir):
    data = tmp_path / "train.jsonl"
    _cfg(tmp_path, tiny_model_dir)  # writes train.jsonl
    env = {"MLFLOW_TRACKING_URI": ""}
    r = run_cli(
        "train",
        "--data",
        str(data),
        "--output",
        "runs/first",
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        "train.max_steps=2",
        cwd=tmp_path,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    assert (tmp_path / "runs" / "mlartifacts").is_dir()
    r = run_cli("runs", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "first" in r.stdout


def test_report_html_renders_in_a_headless_browser(tracked, tmp_path):
    import shutil
    import subprocess

    from conftest import ROOT
    from PIL import Image

    if shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    _, first, _ = tracked
    png = tmp_path / "report.png"
    subprocess.run(
        [ROOT / "scripts" / "screenshot-report.sh", first / "eval" / "report.html", png],
        check=True,
        timeout=120,
    )
    image = Image.open(png).convert("L")
    assert image.size == (1200, 1400)
    lo, hi = image.getextrema()
    assert hi - lo > 200  # text and plots drawn, not a blank page
    grey_levels = sum(1 for count in image.histogram() if count)
    assert grey_levels > 20


def test_a_run_directory_cannot_send_lorafit_to_its_own_store(tmp_path, monkeypatch):
    """run.json names the store a run was tracked in; eval, merge and export log only to the
    store the user configured, so a run directory from someone else reaches no server of its
    choosing (its URI is only compared, never contacted)."""
    import socket

    from lorafit.rundir import write_json
    from lorafit.tracking import tracker_for_run

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    theirs = f"http://127.0.0.1:{listener.getsockname()[1]}"
    run = tmp_path / "their-run"
    run.mkdir()
    tracking = {"uri": theirs, "run_id": "0" * 32, "experiment": "lorafit"}
    write_json(run / "run.json", {"status": "completed", "tracking": tracking})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracker_for_run(run) is None  # the default store is not theirs
    assert tracker_for_run(run, store=f"sqlite:///{tmp_path / 'mine.db'}") is None
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected to the store the run names
    listener.close()
