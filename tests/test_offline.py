"""Offline means a message, not a traceback: every command that needs the Hub fails within a
few seconds with one line saying what it tried to fetch and what to do, whether the network
refuses at once or stalls; `lorafit estimate` works offline for the presets lorafit ships.

HF_HUB_OFFLINE stays unset here, so the reachability probe itself is what runs: HF_ENDPOINT
points it at a closed local port (refused at once) or at a local socket that accepts the
connection and never answers (a stall that only the probe's own timeout ends)."""

import json
import socket
import time

import pytest
from conftest import run_cli, write_jsonl

from lorafit import sources as model_mod
from lorafit.errors import LorafitError

REFUSED = "http://127.0.0.1:9"  # discard port: nothing listens
NOT_SHIPPED = "SomeOrg/some-model-lorafit-never-saw"


@pytest.fixture(scope="module")
def stalls():
    """An endpoint whose connections are accepted (by the kernel's backlog) and never read."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.fixture(params=["refused", "stalls"])
def endpoint(request, stalls):
    return REFUSED if request.param == "refused" else stalls


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-empty"))
    return {"HF_HOME": str(tmp_path / "hf-empty"), "HF_HUB_OFFLINE": ""}


def test_the_probe_gives_up_within_its_timeout(monkeypatch, no_hub, endpoint):
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    start = time.monotonic()
    assert model_mod._hub_reachable(timeout=1.0) is False
    assert time.monotonic() - start < 2.5


def test_a_stalled_name_lookup_does_not_hang(monkeypatch, no_hub):
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(60))
    start = time.monotonic()
    assert model_mod._hub_reachable(timeout=1.0) is False
    assert time.monotonic() - start < 2.5


def test_a_hub_model_fails_fast_with_what_to_do(monkeypatch, no_hub, stalls):
    monkeypatch.setenv("HF_ENDPOINT", stalls)
    start = time.monotonic()
    with pytest.raises(LorafitError) as err:
        model_mod.resolve_model_dir(NOT_SHIPPED)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert NOT_SHIPPED in message and "not reachable" in message
    assert "HF_HOME" in message and "local copy" in message


def _one_clear_line(result, fetched: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and fetched in result.stderr and "HF_HOME" in result.stderr


def test_commands_that_need_the_hub_say_so_in_one_line(tmp_path, no_hub, endpoint):
    env = {**no_hub, "HF_ENDPOINT": endpoint}
    data = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "response": "b"}] * 4)
    commands = {
        "estimate": ["estimate", "--set", f"model.name={NOT_SHIPPED}"],
        "train": ["train", "--data", str(data), "--output", str(tmp_path / "run")]
        + ["--set", f"model.name={NOT_SHIPPED}", "--set", "tracking.enabled=false"],
    }
    # a run trained on a Hub model, as eval and merge find it
    run = tmp_path / "hub-run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model:\n  name: {NOT_SHIPPED}\n")
    base = {"name": NOT_SHIPPED, "kind": "hub", "source": NOT_SHIPPED, "revision": "0" * 40}
    (run / "run.json").write_text(json.dumps({"status": "completed", "base_model": base}))
    commands["eval"] = ["eval", str(run), "--data", str(data)]
    commands["merge"] = ["merge", str(run), "--output", str(tmp_path / "merged")]
    for name, args in commands.items():
        start = time.monotonic()
        result = run_cli(*args, env=env, timeout=120)
        assert time.monotonic() - start < 45, name  # interpreter start + imports + 3 s probe
        _one_clear_line(result, NOT_SHIPPED)
    assert not (tmp_path / "merged").exists()


def test_estimate_works_offline_for_the_shipped_preset(tmp_path, no_hub, stalls):
    result = run_cli(
        "estimate",
        "configs/tinyllama-qlora-4gb.yaml",
        "--gpu-memory",
        "4GiB",
        "--device",
        "cuda",
        "--json",
        env={**no_hub, "HF_ENDPOINT": stalls},
        cwd=tmp_path,  # from any directory: the preset ships inside the package
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["fits"] is True and out["lora_params"] > 10_000_000
