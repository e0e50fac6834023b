"""End to end on the real embedded SmolLM2-135M: a glossary from another domain (brewing)
goes through the real CLI — data generate, train, eval, merge, ask, export, serve — and the
tuned model must beat the base model on held-out phrasings, in lorafit and in real llama.cpp.

Each test asks for the stages it needs as fixtures (trained -> evaluated / merged / exported),
so any one of them runs alone, in any order."""

import json

import pytest
from conftest import DATA, ROOT, run_cli

from lorafit.export import CHECK_PROMPTS

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _train(tmp, output: str, replay: float):
    r = run_cli(
        "train",
        str(ROOT / "configs" / "demo.yaml"),
        "--data",
        str(tmp / "data" / "train.jsonl"),
        "--eval-data",
        str(tmp / "data" / "eval.jsonl"),
        "--output",
        str(tmp / output),
        "--set",
        "train.epochs=5",
        "--set",
        "train.min_steps=0",  # 5 epochs as set: repeating the data would double CI minutes
        "--set",
        "train.batch_size=8",
        "--set",
        "train.grad_accumulation=1",
        "--set",
        f"data.replay={replay}",
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Without replay: the run most of these tests use (replay only adds CI minutes there)."""
    tmp = tmp_path_factory.mktemp("e2e")
    # the default made-up terms (24 for six real ones): with one per term, 6 "I don't know" rows
    # among 89 of every question kind, the tuned model invented 58% of the held-out ones
    r = run_cli("data", "generate", str(DATA / "brewing.yaml"), "--out", str(tmp / "data"))
    assert r.returncode == 0, r.stderr
    _train(tmp, "run", replay=0)
    return tmp


@pytest.fixture(scope="module")
def evaluated(trained):
    r = run_cli(
        "eval",
        str(trained / "run"),
        "--data",
        str(trained / "data" / "eval.jsonl"),
        "--unknown",
        str(trained / "data" / "unknown.jsonl"),
        "--output",
        str(trained / "eval"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((trained / "eval" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def merged(trained):
    r = run_cli("merge", str(trained / "run"), "--output", str(trained / "merged"))
    assert r.returncode == 0, r.stderr[-3000:]
    return trained / "merged"


@pytest.fixture(scope="module")
def exported(trained):
    """f16 and q8_0 GGUFs of the tuned model, each checked in transformers and llama.cpp."""
    reports = {}
    for gguf_type in ("f16", "q8_0"):
        out = trained / "gguf" / f"brewing-{gguf_type}.gguf"
        r = run_cli(
            "export", "gguf", str(trained / "run"), "--output", str(out), "--type", gguf_type
        )
        assert r.returncode == 0, r.stderr[-3000:]
        reports[gguf_type] = json.loads(out.with_suffix(".export.json").read_text())
    return reports


def test_training_lowers_the_loss(trained):
    info = json.loads((trained / "run" / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["results"]["final_loss"] < info["results"]["first_loss"] / 3
    assert (trained / "run" / "loss.png").stat().st_size > 10_000


def test_tuned_beats_base_on_held_out_phrasings(trained, evaluated):
    m = evaluated
    held_out = (trained / "data" / "eval.jsonl").read_text().splitlines()
    assert m["n"] == len(held_out) >= 30  # every held-out question, of every kind
    assert m["base"]["accuracy"] <= 0.2
    assert m["tuned"]["accuracy"] >= 0.6 and m["tuned"]["accuracy"] > m["base"]["accuracy"]
    assert m["tuned"]["stop_rate"] >= 0.9  # stops by itself
    # trained to say "I don't know" for made-up terms, it still answers the real ones
    assert m["tuned"]["refusal_rate"] <= 0.1
    assert m["base"]["general_accuracy"] >= 0.5  # the probe set is answerable by the base model
    # the metrics are the predictions' own verdicts, not constants
    rows = [
        json.loads(x) for x in (trained / "eval" / "predictions.jsonl").read_text().split("\n") if x
    ]
    assert len(rows) == m["n"]
    assert m["tuned"]["accuracy"] == pytest.approx(sum(r["tuned_correct"] for r in rows) / m["n"])
    # scored by kind: each kind's figure is its own rows' verdicts, and the tuned model answers
    # the questions that describe a term and ask for its name better than the base model does
    by_kind = m["tuned"]["by_kind"]
    assert {"define", "expand", "reverse", "followup", "variant"} <= set(by_kind)  # no compare:
    # brewing's six terms share no category or word, so none has a related term to compare
    for kind, score in by_kind.items():
        mine = [r["tuned_correct"] for r in rows if r["kind"] == kind]
        assert score["n"] == len(mine) and score["accuracy"] == pytest.approx(sum(mine) / len(mine))
    assert by_kind["define"]["accuracy"] >= 0.8
    assert by_kind["reverse"]["accuracy"] > m["base"]["by_kind"]["reverse"]["accuracy"]
    probes = (trained / "eval" / "probe_predictions.jsonl").read_text().split("\n")
    probes = [json.loads(x) for x in probes if x]
    right = sum(p["tuned_correct"] for p in probes) / len(probes)
    assert m["tuned"]["general_accuracy"] == pytest.approx(right)
    # made-up terms: the base model invents entries, the tuned one mostly declines
    unknown = (trained / "eval" / "unknown_predictions.jsonl").read_text().split("\n")
    unknown = [json.loads(x) for x in unknown if x]
    assert m["unknown"]["n"] == len(unknown) == 24
    invented = 1 - sum(u["tuned_refused"] for u in unknown) / len(unknown)
    assert m["tuned"]["invented_rate"] == pytest.approx(invented)
    assert m["base"]["invented_rate"] >= 0.8 and m["tuned"]["invented_rate"] <= 0.5


def test_replay_keeps_general_ability(trained, evaluated):
    """The same recipe with replay (the default share) answers more general-ability probes
    than without it: replay is what keeps a tuned model from forgetting."""
    _train(trained, "run-replay", replay=0.2)
    r = run_cli(
        "eval",
        str(trained / "run-replay"),
        "--data",
        str(trained / "data" / "eval.jsonl"),
        "--output",
        str(trained / "eval-replay"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with_replay = json.loads((trained / "eval-replay" / "metrics.json").read_text())
    without = evaluated["tuned"]["general_accuracy"]
    assert with_replay["tuned"]["general_accuracy"] > without
    assert with_replay["tuned"]["general_accuracy"] >= with_replay["base"]["general_accuracy"] - 0.1
    assert with_replay["tuned"]["accuracy"] >= 0.6  # and it still learns the glossary


def test_merge_parity_and_ask(trained, merged):
    report = json.loads((merged / "lorafit_merge.json").read_text())
    assert report["parity_ok"]
    r = run_cli("ask", str(merged), "What does IBU stand for?", "--max-new-tokens", "48")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bitterness" in r.stdout.lower()
    r = run_cli("ask", str(trained / "run"), "What is wort?", "--max-new-tokens", "48")
    assert r.returncode == 0 and "mash" in r.stdout.lower()
    assert "gemm_4bit" not in r.stderr and "Loading weights" not in r.stderr  # no library noise


def test_chat_keeps_the_conversation_and_exits(trained):
    r = run_cli(
        "chat",
        str(trained / "run"),
        "--max-new-tokens",
        "48",
        stdin="What is wort?\nAnd what does OG stand for?\n/exit\n",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.lower()
    assert "mash" in out and "original gravity" in out


def test_export_gguf_round_trips_in_transformers_and_llama_cpp(trained, exported):
    """Both files keep the chat template, end token and tokenizer; f16 gives the merged
    model's greedy answers (near-ties aside) when transformers reads it AND in real llama.cpp,
    which must also answer the held-out questions about as well as lorafit."""
    for gguf_type, report in exported.items():
        assert report["ok"] and report["chat_template_matches"] and report["eos_matches"]
        assert report["tokenizer_ids_match"] and report["gguf_stop_rate"] >= 0.9
        llama = report["engines"]["llama_cpp"]
        assert llama["checked"], llama.get("why")  # make test installs llama.cpp
        held_out = len((trained / "data" / "eval.jsonl").read_text().splitlines())
        assert len(llama["answers"]) == min(CHECK_PROMPTS, held_out)  # spread over the terms
        assert llama["accuracy"] >= report["merged_accuracy"] - 0.25, gguf_type
        if gguf_type == "f16":
            assert report["agreement_up_to_ties"] >= 0.95
            assert llama["agreement_up_to_ties"] >= 0.85
            assert llama["accuracy"] >= report["merged_accuracy"] - 0.12
    folder = trained / "gguf"
    for gguf_type in ("f16", "q8_0"):  # each GGUF its own Modelfile
        text = (folder / f"brewing-{gguf_type}.Modelfile").read_text()
        assert f"FROM ./brewing-{gguf_type}.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
        assert "<|im_start|>{{ .Role }}" in text
    # refuses to overwrite, and a wrong type is a clear error
    out = folder / "brewing-f16.gguf"
    r = run_cli("export", "gguf", str(trained / "run"), "--output", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("export", "gguf", str(trained / "run"), "--output", str(out), "--type", "q2")
    assert r.returncode == 2 and "f16" in r.stderr


def test_serve_answers_the_official_openai_client(trained):
    from openai import OpenAI
    from test_serve import start_server, stop_server

    proc, base = start_server(str(trained / "run"), "--name", "brewing")
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


def test_mlflow_holds_the_whole_lineage(trained, evaluated, merged, exported):
    """One MLflow run: data -> adapter -> evaluation -> merged model -> GGUFs."""
    from mlflow.tracking import MlflowClient

    tracking = json.loads((trained / "run" / "run.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=tracking["uri"])
    run = client.get_run(tracking["run_id"])
    assert run.data.params["model.name"] == "embedded:smollm2-135m-instruct"
    assert run.data.params["dataset.train.path"].endswith("train.jsonl")
    assert run.data.metrics["heldout_accuracy"] == pytest.approx(evaluated["tuned"]["accuracy"])
    tags = run.data.tags
    assert tags["lorafit.merged_dir"].endswith(("merged", "run/merged"))
    assert tags["lorafit.gguf.f16"].endswith("brewing-f16.gguf")
    assert tags["lorafit.gguf.q8_0"].endswith("brewing-q8_0.gguf")
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "eval", "merge", "export", "loss.png"} <= top
    r = run_cli("runs")
    assert r.returncode == 0 and run.info.run_name in r.stdout
