"""End to end on the real embedded SmolLM2-135M: a glossary from another domain (brewing)
goes through the real CLI — data generate, train, eval, merge, ask — and the tuned model must
beat the base model on held-out phrasings."""

import json

import pytest
from conftest import DATA, ROOT, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    # one made-up term per real one (not the default three) keeps this run's CI minutes as they were
    r = run_cli(
        "data", "generate", str(DATA / "brewing.yaml"), "--out", str(tmp / "data"), "--unknown", "6"
    )
    assert r.returncode == 0, r.stderr
    r = run_cli(
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "--data",
        str(tmp / "data" / "train.jsonl"),
        "--eval-data",
        str(tmp / "data" / "eval.jsonl"),
        "--output",
        str(tmp / "run"),
        "--set",
        "train.epochs=5",
        "--set",
        "train.min_steps=0",  # 5 epochs as set: repeating the data would double CI minutes
        "--set",
        "train.batch_size=8",
        "--set",
        "train.grad_accumulation=1",
        # replay is covered by its own tests; here it would only add CI minutes
        "--set",
        "data.replay=0",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp


def test_training_lowers_the_loss(pipeline):
    info = json.loads((pipeline / "run" / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["results"]["final_loss"] < info["results"]["first_loss"] / 3
    assert (pipeline / "run" / "loss.png").stat().st_size > 10_000


def test_tuned_beats_base_on_held_out_phrasings(pipeline):
    r = run_cli(
        "eval",
        str(pipeline / "run"),
        "--data",
        str(pipeline / "data" / "eval.jsonl"),
        "--output",
        str(pipeline / "eval"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((pipeline / "eval" / "metrics.json").read_text())
    assert m["n"] == 18
    assert m["base"]["accuracy"] <= 0.2
    assert m["tuned"]["accuracy"] >= 0.6 and m["tuned"]["accuracy"] > m["base"]["accuracy"]
    assert m["tuned"]["stop_rate"] >= 0.9  # stops by itself
    # trained to say "I don't know" for made-up terms, it still answers the real ones
    assert m["tuned"]["refusal_rate"] <= 0.1
    assert m["base"]["general_accuracy"] >= 0.5  # the probe set is answerable by the base model
    assert "general_accuracy" in m["tuned"]


def test_merge_parity_and_ask(pipeline):
    r = run_cli("merge", str(pipeline / "run"), "--output", str(pipeline / "merged"))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((pipeline / "merged" / "lorafit_merge.json").read_text())
    assert report["parity_ok"]
    r = run_cli(
        "ask", str(pipeline / "merged"), "What does IBU stand for?", "--max-new-tokens", "48"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bitterness" in r.stdout.lower()
    r = run_cli("ask", str(pipeline / "run"), "What is wort?", "--max-new-tokens", "48")
    assert r.returncode == 0 and "mash" in r.stdout.lower()


def test_chat_keeps_the_conversation_and_exits(pipeline):
    r = run_cli(
        "chat",
        str(pipeline / "run"),
        "--max-new-tokens",
        "48",
        stdin="What is wort?\nAnd what does OG stand for?\n/exit\n",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.lower()
    assert "mash" in out and "original gravity" in out


def test_export_gguf_round_trips(pipeline):
    """f16 and q8_0 GGUFs of the tuned model, each loaded back and checked against the merge."""
    for gguf_type in ("f16", "q8_0"):
        out = pipeline / "gguf" / f"brewing-{gguf_type}.gguf"
        r = run_cli(
            "export", "gguf", str(pipeline / "run"), "--output", str(out), "--type", gguf_type
        )
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads(out.with_suffix(".export.json").read_text())
        assert report["ok"] and report["chat_template_matches"] and report["eos_matches"]
        assert report["tokenizer_ids_match"]
        assert report["gguf_stop_rate"] >= 0.9
        if gguf_type == "f16":
            assert report["agreement"] == 1.0  # the same greedy answers as the merged model
        assert report["gguf_accuracy"] >= report["merged_accuracy"] - 0.25
    modelfile = (pipeline / "gguf" / "Modelfile").read_text()
    assert "FROM ./brewing-q8_0.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    # refuses to overwrite, and a wrong type is a clear error
    r = run_cli("export", "gguf", str(pipeline / "run"), "--output", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("export", "gguf", str(pipeline / "run"), "--output", str(out), "--type", "q2")
    assert r.returncode == 2 and "f16" in r.stderr


def test_serve_answers_the_official_openai_client(pipeline):
    from openai import OpenAI
    from test_serve import start_server, stop_server

    proc, base = start_server(str(pipeline / "run"), "--name", "brewing")
    try:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        question = [{"role": "user", "content": "What does IBU stand for?"}]
        reply = client.chat.completions.create(model="brewing", messages=question, max_tokens=48)
        assert "bitterness" in reply.choices[0].message.content.lower()
        assert reply.choices[0].finish_reason == "stop"  # stops by itself
        stream = client.chat.completions.create(
            model="brewing",
            messages=[{"role": "user", "content": "What is wort?"}],
            max_tokens=48,
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "mash" in text.lower()
    finally:
        stop_server(proc)


def test_mlflow_holds_the_whole_lineage(pipeline):
    """One MLflow run: data -> adapter -> evaluation -> merged model -> GGUFs (runs after the
    tests above in this module)."""
    from mlflow.tracking import MlflowClient

    tracking = json.loads((pipeline / "run" / "run.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(tracking["run_id"])
    assert run.data.params["model.name"] == "embedded:smollm2-135m-instruct"
    assert run.data.params["dataset.train.path"].endswith("train.jsonl")
    assert run.data.metrics["heldout_accuracy"] >= 0.6
    tags = run.data.tags
    assert tags["lorafit.merged_dir"].endswith("merged")
    assert tags["lorafit.gguf.f16"].endswith("brewing-f16.gguf")
    assert tags["lorafit.gguf.q8_0"].endswith("brewing-q8_0.gguf")
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "eval", "merge", "export", "loss.png"} <= top
    r = run_cli("runs")
    assert r.returncode == 0 and "run" in r.stdout
