"""Time to a correct model: how long each recipe trains before it answers held-out questions.

    make bench                                  # speed (bench.py), then this
    .venv/bin/python bench/time_to_quality.py [--terms 68] [--cap-epochs 4] [--rounds 1]

Workload: the demo's data, the shipped glossary's generated questions (every kind, made-up
terms) with its held-out set; accuracy is measured on the held-out ``define`` questions (the
demo's classic held-out set) with lorafit's judge, greedy, 64 tokens. Each configuration trains
in its own subprocess and is evaluated every half epoch (the clock stops while it is
evaluated) until 95% or ``--cap-epochs``; reported: seconds and tokens to 90% and 95%, peak RSS
and the accuracy curve. Configurations:

- ``lorafit``: lorafit's default recipe (``demo`` preset: answer-only loss, shared prefix,
  LoRA r16 all-linear, lr 1e-3, batch 16 x 1, replay 0.3 with the KL term, precision auto);
- ``trl_documented``: TRL's SFTTrainer as its documentation writes it: its defaults (lr 2e-5,
  per-device batch 8, bf16 and gradient checkpointing on) on a conversational
  prompt/completion dataset, plus LoRA r16 on all linear layers;
- ``trl_lorafit_lr``: the same TRL script with lorafit's learning rate and batch (1e-3, 16 x 1),
  so the recipe's share and the engine's share of the lead separate;
- ``seed_recipe``: the seed notebook's recipe ("### Prompt" text, loss on all tokens, LoRA r8
  q/v, lr 1e-4, batch 1 x 16).
``--precision equal`` runs every configuration in fp32 instead of its documented default.
Writes ``time_to_quality`` (``time_to_quality_equal_precision`` with ``--precision equal``),
its setup and lorafit's speedups over the TRL recipes into bench/results.json, and the plot
bench/time_to_quality.png (bench/time_to_quality_equal_precision.png).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("lorafit", "trl_documented", "trl_lorafit_lr", "seed_recipe")
TARGETS = (0.90, 0.95)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def workload(work: Path, terms: int) -> tuple[Path, Path]:
    from lorafit.config import load_config
    from lorafit.data.generate import write_generated
    from lorafit.data.glossary import Glossary, load_glossary

    data = load_config("demo").data
    full = load_glossary("lorafit:glossaries/aviation.yaml")
    sliced = Glossary(terms=full.terms[:terms], domain=full.domain, source=full.source)
    out = work / "data"
    write_generated(
        sliced,
        out,
        kinds=data.kinds,
        eval_kinds=data.eval_kinds,
        overwrite=True,
        unknown_train=None,
    )
    return out / "train.jsonl", out / "eval.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n") if line]


class Probe:
    """A TrainerCallback: every ``every`` optimizer steps, stop the clock, answer the held-out
    questions, record (training seconds, tokens, accuracy); stop at 95% or the cap."""

    def __init__(self, questions, tokenizer, fmt, every: int, tokens_per_step: float, cap: int):
        from transformers import TrainerCallback

        self.questions, self.tokenizer, self.fmt = questions, tokenizer, fmt
        self.every, self.tokens_per_step, self.cap = every, tokens_per_step, cap
        self.curve: list[list[float]] = []
        self.train_s, self.last = 0.0, None
        probe = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if probe.last is None:
                    probe.last = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kw):
                step = state.global_step
                if step % probe.every and step < probe.cap:
                    return
                probe.train_s += time.perf_counter() - probe.last
                accuracy = probe.accuracy(model)
                probe.curve.append([probe.train_s, step * probe.tokens_per_step, accuracy, step])
                print(f"[ttq] step {step}: {accuracy:.1%} after {probe.train_s:.0f} s", flush=True)
                if accuracy >= TARGETS[-1] or step >= probe.cap:
                    control.should_training_stop = True
                probe.last = time.perf_counter()

        self.callback = Callback()

    def accuracy(self, model) -> float:
        import torch

        from lorafit.judge import judge

        was_training = model.training
        model.eval()
        tok = self.tokenizer
        tok.padding_side = "left"
        right = 0
        for start in range(0, len(self.questions), 48):
            batch = self.questions[start : start + 48]
            enc = tok(
                [self.fmt(r["prompt"]) for r in batch],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=64,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
            for r, ids in zip(batch, out[:, enc["input_ids"].shape[1] :], strict=True):
                answer = tok.decode(ids, skip_special_tokens=True).split("###")[0].strip()
                right += judge(r["prompt"], r["response"], answer)
        if was_training:
            model.train()
        return right / len(self.questions)


def _chat(tok):
    return lambda q: tok.apply_chat_template(
        [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
    )


def run_lorafit(work, train, questions, cap_epochs, precision):
    from lorafit.config import load_config
    from lorafit.model import load_tokenizer
    from lorafit.sources import resolve_model_dir
    from lorafit.train import train as lorafit_train

    sets = [f"data.train={train}", f"output_dir={work / 'lorafit-run'}", "tracking.enabled=false"]
    sets += ["train.save_steps=100000", f"train.epochs={cap_epochs}"]
    if precision == "equal":
        sets.append("train.precision=fp32")
    cfg = load_config("demo", sets)
    rows = len(_rows(train))
    steps_per_epoch = math.ceil(rows / (1 - cfg.data.replay) / 16)
    tok = load_tokenizer(resolve_model_dir())
    tokens_per_step = _tokens(tok, train) / rows * 16
    probe = Probe(
        questions,
        tok,
        _chat(tok),
        max(1, int(steps_per_epoch // 2)),
        tokens_per_step,
        int(steps_per_epoch * cap_epochs),
    )
    lorafit_train(cfg, overwrite=True, show_progress=False, callbacks=[probe.callback])
    return probe, "bf16" if _bf16(precision) else "fp32"


def _turns(row: dict) -> list[dict]:
    """A row's prompt as chat turns: a follow-up's earlier turns, then its question (every
    recipe trains on the same conversations lorafit does)."""
    return [*row.get("history", []), {"role": "user", "content": row["prompt"]}]


def _tokens(tok, train) -> float:
    return sum(
        len(
            tok.apply_chat_template(
                [*_turns(r), {"role": "assistant", "content": r["response"]}],
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for r in _rows(train)
    )


def _bf16(precision: str) -> bool:
    from lorafit.model import cpu_has_bf16

    return precision != "equal" and cpu_has_bf16()


def run_trl(work, train, questions, cap_epochs, precision, lr=None, batch=None):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lorafit.sources import resolve_model_dir

    torch.manual_seed(42)
    model_dir = resolve_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = _rows(train)
    data = Dataset.from_list(
        [
            {
                "prompt": _turns(r),
                "completion": [{"role": "assistant", "content": r["response"]}],
            }
            for r in rows
        ]
    )
    kwargs = {
        "bf16": _bf16(precision),
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "seed": 42,
    }
    per_device, accumulation = batch or (8, 1)
    if lr:
        kwargs["learning_rate"] = lr  # else TRL's documented default
    args = SFTConfig(
        output_dir=str(work / "trl"),
        num_train_epochs=cap_epochs,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        **kwargs,
    )
    steps_per_epoch = -(-len(rows) // (per_device * accumulation))
    tokens_per_step = _tokens(tok, train) / len(rows) * per_device * accumulation
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    probe = _train_probed(
        (model, tok, args, data, peft), questions, _chat(tok), steps_per_epoch, tokens_per_step
    )
    return probe, "bf16" if kwargs["bf16"] else "fp32"


def run_seed(work, train, questions, cap_epochs, precision):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling
    from trl import SFTConfig

    from lorafit.sources import resolve_model_dir

    torch.manual_seed(42)
    model_dir = resolve_model_dir()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = _rows(train)

    def text(q, a="", history=()):
        earlier = "".join(
            f"### {'Prompt' if t['role'] == 'user' else 'Response'}: {t['content']}\n"
            for t in history
        )
        return f"{earlier}### Prompt: {q}\n### Response: {a}"

    data = Dataset.from_list(
        [{"text": text(r["prompt"], r["response"], r.get("history", ()))} for r in rows]
    )
    args = SFTConfig(
        output_dir=str(work / "seed"),
        num_train_epochs=cap_epochs,
        learning_rate=1e-4,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=16,
        dataset_text_field="text",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=42,
    )
    steps_per_epoch = -(-len(rows) // 16)
    tokens_per_step = (
        sum(
            len(tok(text(r["prompt"], r["response"], r.get("history", ())))["input_ids"])
            for r in rows
        )
        / len(rows)
        * 16
    )
    peft = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    collator = DataCollatorForLanguageModeling(tokenizer=tok, mlm=False)
    probe = _train_probed(
        (model, tok, args, data, peft), questions, text, steps_per_epoch, tokens_per_step, collator
    )
    return probe, "fp32"


def _train_probed(setup, questions, chat, steps_per_epoch, tokens_per_step, collator=None):
    """Train a TRL SFTTrainer on ``setup`` (model, tokenizer, SFTConfig, dataset, LoRA config),
    asking the held-out questions every half epoch; the Probe holds the curve."""
    from trl import SFTTrainer

    model, tok, args, data, peft = setup
    epochs = int(args.num_train_epochs)
    probe = Probe(
        questions,
        tok,
        chat,
        max(1, steps_per_epoch // 2),
        tokens_per_step,
        steps_per_epoch * epochs,
    )
    extra = {"data_collator": collator} if collator else {}
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=peft,
        callbacks=[probe.callback],
        **extra,
    )
    trainer.train()
    return probe


def worker(name, work, train, evals, cap_epochs, precision, out: Path) -> None:
    questions = [r for r in _rows(evals) if r.get("kind", "define") == "define"]
    runners = {
        "lorafit": lambda: run_lorafit(work, train, questions, cap_epochs, precision),
        "trl_documented": lambda: run_trl(work, train, questions, cap_epochs, precision),
        "trl_lorafit_lr": lambda: run_trl(
            work, train, questions, cap_epochs, precision, lr=1e-3, batch=(16, 1)
        ),
        "seed_recipe": lambda: run_seed(work, train, questions, cap_epochs, precision),
    }
    probe, used = runners[name]()
    result = {"curve": [[round(s, 1), a] for s, _, a, _ in probe.curve], "precision": used}
    for target in TARGETS:
        hit = next((point for point in probe.curve if point[2] >= target), None)
        key = f"seconds_to_{round(target * 100)}"
        result[key] = round(hit[0], 1) if hit else None
        if target == TARGETS[-1]:
            result["tokens_to_95"] = round(hit[1]) if hit else None
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out.write_text(json.dumps(result))


def summarize(runs: list[dict]) -> dict:
    """Medians over the rounds (None when any round hit the cap first), the median round's
    curve, and every round as it came."""
    import statistics

    out: dict = {}
    for key in ("seconds_to_90", "seconds_to_95", "tokens_to_95", "peak_rss_bytes"):
        values = [run[key] for run in runs]
        out[key] = None if None in values else statistics.median(values)
    ranked = sorted(runs, key=lambda run: run["curve"][-1][0] if run["curve"] else 0)
    out["curve"] = ranked[len(ranked) // 2]["curve"]
    out["precision"] = runs[0]["precision"]
    out["rounds"] = runs
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        if r and r.get("curve"):
            xs, ys = zip(*r["curve"], strict=True)
            ax.plot(
                [x / 60 for x in xs],
                [100 * y for y in ys],
                marker="o",
                label=f"{name} ({r['precision']})",
            )
    for target in TARGETS:
        ax.axhline(100 * target, color="#999", linewidth=0.8, linestyle="--")
    ax.set_xlabel("training minutes (evaluation not counted)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"time to quality: {cpu_model()}, 2 cores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--terms", type=int, default=68, help="glossary terms (68: the demo)")
    parser.add_argument("--cap-epochs", type=int, default=4)
    parser.add_argument("--precision", choices=("default", "equal"), default="default")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each in another order")
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-ttq"))
    parser.add_argument("--results", type=Path, default=ROOT / "bench")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = parser.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    train, evals = a.work / "data" / "train.jsonl", a.work / "data" / "eval.jsonl"
    if a.worker:
        worker(a.worker, a.work, train, evals, a.cap_epochs, a.precision, a.out)
        return
    workload(a.work, a.terms)
    rounds: list[dict] = []
    for r in range(a.rounds):  # each round starts with another configuration (drift cancels)
        order = a.only[r % len(a.only) :] + a.only[: r % len(a.only)]
        done = {}
        for name in order:
            out = a.work / f"{name}.round{r}.json"
            print(f"[ttq] round {r + 1}/{a.rounds}: {name} ...", flush=True)
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(out)]
            cmd += ["--work", str(a.work), "--cap-epochs", str(a.cap_epochs)]
            cmd += ["--precision", a.precision]
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            subprocess.run(cmd, check=True, env=env)
            done[name] = json.loads(out.read_text())
        rounds.append(done)
    table = {name: summarize([done[name] for done in rounds]) for name in a.only}
    results_file = a.results / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    # the equal-precision table sits beside the documented-default one, never over it
    key = "time_to_quality" + ("_equal_precision" if a.precision == "equal" else "")
    results[key] = table
    results[f"{key}_setup"] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "terms": a.terms,
        "cap_epochs": a.cap_epochs,
        "precision": a.precision,
        "rounds": a.rounds,
        "heldout": "define questions of the demo's held-out set",
    }
    mine = table.get("lorafit", {})
    for other in ("trl_documented", "trl_lorafit_lr"):
        if other not in table:
            results.pop(f"{key}_speedup_vs_{other}", None)  # never a ratio to a row now gone
            continue
        theirs = table[other]
        speedup = at_least = None  # null where either hit the cap first
        if mine.get("seconds_to_95") and theirs.get("seconds_to_95"):
            speedup = theirs["seconds_to_95"] / mine["seconds_to_95"]
        elif mine.get("seconds_to_95") and all(r["curve"] for r in theirs["rounds"]):
            # their shortest round trained this long without reaching 95%: at least this
            shortest = min(r["curve"][-1][0] for r in theirs["rounds"])
            at_least = shortest / mine["seconds_to_95"]
        results[f"{key}_speedup_vs_{other}"] = speedup
        results[f"{key}_speedup_vs_{other}_at_least"] = at_least
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    plot(table, a.results / f"{key}.png")
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
