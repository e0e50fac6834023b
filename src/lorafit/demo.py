"""`lorafit demo`: the main job in one command, on the embedded model and shipped glossary.

generate data -> train (the `demo` preset) -> evaluate base vs tuned -> merge -> show answers.

    lorafit demo --output runs/demo
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import Config
from lorafit.data.formats import read_jsonl_lines
from lorafit.data.generate import write_generated
from lorafit.data.glossary import load_glossary
from lorafit.errors import LorafitError
from lorafit.judge import judge
from lorafit.paths import refuse_unsafe_target
from lorafit.rundir import RunDir, write_json

# The seed project's own test questions, and the glossary term each one asks about.
SEED_QUESTIONS = (
    ("What is EEC?", "EEC"),
    ("Explain what is APU.", "APU"),
    ("What can I see in MM03?", "MM03"),
    ("What is AHEAD?", "AHEAD"),
    ("What is EPEP?", "EPEP"),
    ("What is BER?", "BER"),
)


@dataclass
class DemoResult:
    run_dir: Path
    merged_dir: Path
    metrics: dict
    merge: dict
    samples: list[dict]
    seed_questions: list[dict]
    timings: dict[str, float]


def ask_seed_questions(model_dir: Path, glossary, max_new_tokens: int = 64) -> list[dict]:
    """Ask the seed's questions whose term is in ``glossary``; judge against its answer."""
    from lorafit.data.kinds import answer_for
    from lorafit.inference import chat_prompt, generate, load_for_inference

    terms = {t.term: t for t in glossary.terms}
    asked = [(q, terms[t]) for q, t in SEED_QUESTIONS if t in terms]
    if not asked:
        return []
    loaded = load_for_inference(model_dir)
    answers = generate(
        loaded.model,
        loaded.tokenizer,
        [chat_prompt(q, loaded.system_prompt) for q, _ in asked],
        max_new_tokens,
    )
    return [
        {
            "prompt": q,
            "reference": answer_for(t),
            "answer": a,
            "stopped": stopped,
            "correct": judge(q, answer_for(t), a),
        }
        for (q, t), (a, stopped) in zip(asked, answers, strict=True)
    ]


def run_demo(config: Config, output: Path, overwrite: bool = False, console=None) -> DemoResult:
    from lorafit.evaluate import evaluate
    from lorafit.merge import merge
    from lorafit.progress import answer_progress
    from lorafit.train import train

    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def say(msg: str) -> None:
        if console is not None:
            console.print(msg)

    def lap(stage: str) -> None:
        now = time.perf_counter()
        timings[stage] = round(now - clock[0], 1)
        clock[0] = now
        say(f"    [dim]{stage} took {timings[stage]:.0f} s[/]")

    if not config.data.glossary:
        raise LorafitError("the demo config needs data.glossary (a glossary file)")
    output = Path(output)
    if overwrite:
        refuse_unsafe_target(output, "--output")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise LorafitError(
            f"{output}: already exists; choose another --output or pass --overwrite to replace "
            "the demo in it"
        )
    glossary = load_glossary(config.data.glossary)
    data_dir = output / "data"
    train_path, eval_path, n_train, n_eval = write_generated(
        glossary,
        data_dir,
        seed=config.data.seed,
        unknown_train=config.data.unknown_terms,
        overwrite=overwrite,
        kinds=config.data.kinds,
        eval_kinds=config.data.eval_kinds,
    )
    say(
        f"[bold]1/4 data[/]: {len(glossary.terms)} terms -> {n_train} train / {n_eval} held-out "
        f"prompts in {data_dir}"
    )
    lap("data")
    config.data.train, config.data.eval = str(train_path), str(eval_path)
    config.output_dir = str(output / "run")
    say(
        f"[bold]2/4 train[/]: {config.model.name}, LoRA r={config.lora.r}, "
        f"{config.train.epochs:g} epochs, lr {config.train.lr:g}"
    )
    run_dir = train(config, overwrite=overwrite)
    lap("train")
    gc.collect()  # the trainer holds reference cycles: drop its model before the next stage
    say(f"[bold]3/4 eval[/]: base vs tuned on {n_eval} held-out phrasings")
    bar = answer_progress("base and tuned answers") if console else contextlib.nullcontext()
    with bar as progress:
        metrics = evaluate(
            run_dir,
            eval_path,
            settings=config.eval,
            progress=progress,
            unknown=data_dir / "unknown.jsonl" if (data_dir / "unknown.jsonl").is_file() else None,
        )
    lap("eval")
    gc.collect()
    say("[bold]4/4 merge[/]")
    merged_dir = output / RunDir.MERGED
    merge_report = merge(run_dir, merged_dir, overwrite=overwrite)
    lap("merge")
    pred_file = Path(metrics["output"]) / "predictions.jsonl"
    gc.collect()
    rows = read_jsonl_lines(pred_file)
    samples = rows[:: max(1, len(rows) // 6)][:6]
    seed = ask_seed_questions(merged_dir, glossary, config.eval.max_new_tokens)
    write_json(output / "seed_questions.json", seed)
    lap("seed_questions")
    timings["total"] = round(sum(timings.values()), 1)
    write_json(output / "timings.json", timings)
    return DemoResult(run_dir, merged_dir, metrics, merge_report, samples, seed, timings)
