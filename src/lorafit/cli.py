"""The `lorafit` command line: argument parsing and dispatch only; the stages hold the logic."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorafit.data.generate import UNKNOWN_EVAL_TERMS
from lorafit.errors import LorafitError

console = Console()
app = typer.Typer(
    help="Fine-tune a small open LLM into a domain expert with LoRA/QLoRA, on a CPU or small GPU.\n\n"
    "Quick start: `lorafit demo` (generate data -> train -> eval -> merge on the embedded model).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Generate and check training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")
export_app = typer.Typer(help="Export a tuned model for other runtimes.", no_args_is_help=True)
app.add_typer(export_app, name="export")
runs_app = typer.Typer(
    help="Tracked runs (MLflow): a table best first, or `lorafit runs compare A B`.",
    invoke_without_command=True,
)
app.add_typer(runs_app, name="runs")
StoreOpt = Annotated[
    str | None,
    typer.Option(
        "--store", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or runs/mlflow.db)."
    ),
]

ConfigArg = Annotated[
    str | None,
    typer.Argument(
        help="YAML config, or a shipped preset by name (demo, tinyllama-qlora-4gb); "
        "defaults apply without one."
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set train.lr=5e-4 (repeatable)."),
]


def _setup() -> None:
    from dotenv import load_dotenv

    # HF_TOKEN etc. from the working directory's .env (never printed); the variables already
    # set win
    load_dotenv(Path.cwd() / ".env", override=False)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MLflow configures its own loggers at import, at INFO ("Creating initial MLflow database
    # tables...") unless told otherwise
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[_rich_handler()])
    for noisy in (
        "httpx",
        "urllib3",
        "huggingface_hub",
        "datasets",
        "filelock",
        "matplotlib",
        "mlflow",
        "alembic",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes 0.50 warns on import on bf16 CPUs that an optional kernel package is
    # missing: nothing a user can act on, and it printed before every answer of `lorafit ask`
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft 0.21 calls a transformers 5 property that warns on every model wrap; nothing a user
    # can act on, and it repeats once per stage of the demo
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars per model
    except ImportError:  # pragma: no cover
        pass


def _rich_handler() -> logging.Handler:
    from rich.logging import RichHandler

    return RichHandler(console=Console(stderr=True), show_time=False, show_path=False)


def _config(config: str | Path | None, sets: list[str] | None, flags: dict | None = None):
    from lorafit.config import load_config

    return load_config(config, sets, flags)


@data_app.command("generate")
def data_generate(
    glossary: Annotated[str, typer.Argument(help="Glossary file (YAML, JSON or CSV).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for train.jsonl and eval.jsonl.")],
    seed: Annotated[int, typer.Option(help="Seed for phrasing choice and order.")] = 0,
    kinds: Annotated[
        str | None,
        typer.Option(
            help="Training questions per term of each kind, e.g. define=6,reverse=3 (kinds: "
            "define, expand, reverse, followup, compare, variant; others keep the default).",
        ),
    ] = None,
    eval_kinds: Annotated[
        str | None, typer.Option(help="Held-out questions per term of each kind, as --kinds.")
    ] = None,
    per_term: Annotated[
        int | None,
        typer.Option(help="Training 'define' phrasings per term (as --kinds define=N).", min=0),
    ] = None,
    eval_per_term: Annotated[
        int | None, typer.Option(help="Held-out 'define' phrasings per term.", min=0)
    ] = None,
    unknown: Annotated[
        int | None,
        typer.Option(
            help="Train questions about made-up terms, answered 'I don't know' "
            "(default: two per glossary term; a small glossary gets up to 24, never more "
            "than four per term).",
            min=0,
        ),
    ] = None,
    unknown_eval: Annotated[
        int, typer.Option(help="Held-out made-up terms (unknown.jsonl) for eval --unknown.", min=0)
    ] = UNKNOWN_EVAL_TERMS,
    overwrite: Annotated[
        bool, typer.Option(help="Replace data files a previous `data generate` wrote there.")
    ] = False,
) -> None:
    """Generate question/answer pairs from a glossary: every term in train, held-out paraphrases in eval.

    GLOSSARY may be lorafit:glossaries/aviation.yaml, the example that ships with lorafit.
    """
    from lorafit.data.generate import default_unknown_terms, write_generated
    from lorafit.data.glossary import load_glossary

    counts = {"data.kinds": kinds, "data.eval_kinds": eval_kinds}
    sets = [f"{key}={{{value.replace('=', ': ')}}}" for key, value in counts.items() if value]
    data = _config(None, sets).data
    g = load_glossary(glossary)
    unknown = default_unknown_terms(g) if unknown is None else unknown
    train, evals, n_train, n_eval = write_generated(
        g,
        out,
        seed=seed,
        unknown_train=unknown,
        unknown_eval=unknown_eval,
        overwrite=overwrite,
        kinds=data.kinds,
        eval_kinds=data.eval_kinds,
        train_per_term=per_term,
        eval_per_term=eval_per_term,
    )
    console.print(
        f"{len(g.terms)} terms -> [bold]{n_train}[/] train prompts ({escape(str(train))}; "
        f'{unknown} about made-up terms, answered "I don\'t know"), [bold]{n_eval}[/] held-out '
        f"prompts ({escape(str(evals))}), {unknown_eval} held-out made-up terms "
        f"({escape(str(Path(out) / 'unknown.jsonl'))})"
    )


@data_app.command("extract")
def data_extract(
    files: Annotated[
        list[Path], typer.Argument(help="Documents: .xlsx, .csv, .docx, .pdf, .md, .txt.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The glossary to write (.yaml).")],
    domain: Annotated[str | None, typer.Option(help="The glossary's domain (optional).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """Find term/definition pairs in documents and write a glossary to review.

    Tables (header found below titles, in any column order) and "TERM - definition",
    "TERM: definition", "Term (ACR) is ..." lines. Every term keeps its source; duplicates,
    conflicting definitions and entries that look wrong are listed, never merged silently.
    """
    from lorafit.data.extract import extract, glossary_yaml

    if out.suffix not in (".yaml", ".yml"):
        raise LorafitError(f"--out {out}: write the glossary as a .yaml file")
    if out.exists() and not overwrite:
        raise LorafitError(f"{out}: already exists; choose another --out or pass --overwrite")
    found = extract(files)  # every file read and checked before anything is written
    if not found.terms:
        raise LorafitError(
            "no term/definition pairs found in "
            + ", ".join(str(f) for f in files)
            + "; see `lorafit data extract --help` for the layouts it reads"
        )
    from lorafit.rundir import temp_sibling_write

    temp_sibling_write(out, glossary_yaml(found, domain))
    table = Table(title=f"extracted into {escape(str(out))}")
    for col in ("file", "terms"):
        table.add_column(col)
    for name, count in found.per_file.items():
        table.add_row(escape(name), str(count))
    console.print(table)
    for where, columns in found.columns.items():
        used = ", ".join(f"{k} = {escape(v)!s}" for k, v in columns.items())
        console.print(f"[dim]{escape(where)}: columns {used}[/]")
    for kept, other in found.conflicts:
        console.print(
            f"[yellow]conflict[/] {escape(kept.term)}: {escape(kept.source)} and "
            f"{escape(other.source)} define it differently (the first is in the glossary; the "
            "other is a comment at its top)"
        )
    for kept, again in found.duplicates:
        console.print(f"[dim]duplicate[/] {escape(kept.term)}: also at {escape(again.source)}")
    for where, why in found.skipped:
        console.print(f"[yellow]skipped[/] {escape(where)}: {escape(why)}")
    console.print(
        f"{len(found.terms)} terms, {len(found.conflicts)} conflicts, {len(found.duplicates)} "
        f"duplicates, {len(found.skipped)} skipped. Review {escape(str(out))}, then: lorafit "
        f"data generate {escape(str(out))} --out data/generated"
    )


@data_app.command("check")
def data_check(
    files: Annotated[list[Path], typer.Argument(help="Data files (JSONL / JSON).")],
    model: Annotated[str | None, typer.Option(help="Model whose tokenizer counts tokens.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Length limit to check against.")] = None,
    config: Annotated[
        str | None, typer.Option(help="Take model/max_length from a config (file or preset).")
    ] = None,
) -> None:
    """Validate data files and print stats (rows, token lengths, duplicates, over-length rows)."""
    from lorafit.data.check import check_files

    cfg = _config(config, None, {"model.name": model, "data.max_length": max_length})
    reports = check_files(files, cfg.model.name, cfg.data.max_length)
    table = Table(title="data check")
    for col in (
        "file",
        "format",
        "rows",
        "tokens min/mean/max",
        "duplicates",
        f"> {cfg.data.max_length} tok",
    ):
        table.add_column(col)
    for r in reports:
        table.add_row(
            escape(r.path),
            r.format,
            str(r.rows),
            f"{r.min_tokens}/{r.mean_tokens:.0f}/{r.max_tokens}",
            str(r.duplicates),
            str(r.over_length),
        )
    console.print(table)
    for r in reports:
        for w in r.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")


@app.command()
def train(
    config: ConfigArg = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Training file (sets data.train).")
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Held-out file (data.eval).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Run directory (output_dir).")
    ] = None,
    sets: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue from the run's last checkpoint.")] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Load a base model that only has pickle weights (.bin/.pt). Pickles can run "
            "code: only for files you trust.",
        ),
    ] = False,
    auto_fit: Annotated[
        bool,
        typer.Option(
            "--auto-fit",
            help="If the estimate exceeds --gpu-memory, apply the first setting change that fits.",
        ),
    ] = False,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Memory budget for --auto-fit, e.g. 4GiB."),
    ] = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="Train data-parallel in N processes per machine: starts torchrun for you "
            "(one per GPU; on CPU, gloo).",
            min=1,
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option("--nnodes", help="Machines taking part (with --nproc).", min=1)
    ] = 1,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(
            "--rdzv-endpoint",
            help="HOST:PORT every machine can reach (multi-node; run the same command on each).",
        ),
    ] = None,
) -> None:
    """Train a LoRA adapter (TRL SFTTrainer + PEFT) into a self-describing run directory.

    Several GPUs or machines: `--nproc N` (plus `--nnodes M --rdzv-endpoint HOST:PORT` on
    every machine), or start `torchrun ... -m lorafit train ...` / `accelerate launch` yourself.
    """
    if nproc is not None:
        from lorafit.launch import launch_torchrun

        raise typer.Exit(launch_torchrun(sys.argv[1:], nproc, nnodes, rdzv_endpoint))
    from lorafit.train import train as run_train

    cfg = _config(
        config,
        sets,
        {
            "data.train": str(data) if data else None,
            "data.eval": str(eval_data) if eval_data else None,
            "output_dir": str(output) if output else None,
            "model.allow_pickle": True if allow_pickle else None,
        },
    )
    if auto_fit:
        from lorafit.estimate import auto_fit as fit_to_budget

        cfg, message = fit_to_budget(cfg, gpu_memory)
        console.print(f"[yellow]{escape(message)}[/]")
    run_dir = run_train(cfg, overwrite=overwrite, resume=resume)
    from lorafit.launch import process_rank

    if process_rank()[0] != 0:
        return  # under torchrun, rank 0 reports
    console.print(
        f"[green]done[/]: adapter and metrics in [bold]{escape(str(run_dir))}[/] "
        f"(loss curve: {escape(str(run_dir / 'loss.png'))})"
    )


@app.command("eval")
def eval_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory.")],
    data: Annotated[Path, typer.Option("--data", help="Held-out prompts with reference answers.")],
    output: Annotated[
        Path | None, typer.Option("--output", help="Where to write (default RUN_DIR/eval).")
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="Config whose eval section applies (default: the run's own config)."),
    ] = None,
    sets: SetOpt = None,
    limit: Annotated[
        int | None, typer.Option(help="Only the first N prompts (eval.limit).")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Answer length bound (eval.max_new_tokens).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Prompts generated together (eval.batch_size).")
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="auto (bf16 where the hardware has it natively, ~2x faster on such CPUs; "
            "fp16 on older GPUs; else fp32), fp32, bf16 or fp16 (eval.precision)."
        ),
    ] = None,
    no_probes: Annotated[
        bool, typer.Option("--no-probes", help="Skip the general-ability probe set.")
    ] = False,
    unknown: Annotated[
        Path | None,
        typer.Option(
            "--unknown",
            help="Questions about made-up terms (unknown.jsonl from `data generate`): "
            "measures how often each model invents an answer.",
        ),
    ] = None,
    store: StoreOpt = None,
) -> None:
    """Answer every prompt with the base and the tuned model; write predictions, metrics, report.

    Also runs the general-ability probes (lorafit:probes/general.jsonl) on both models and
    reports base/tuned general_accuracy and the probes that regressed.
    """
    from lorafit.evaluate import DEFAULT_PROBES, evaluate
    from lorafit.progress import answer_progress
    from lorafit.rundir import RunDir

    flags = {
        "eval.limit": limit,
        "eval.max_new_tokens": max_new_tokens,
        "eval.batch_size": batch_size,
        "eval.precision": precision,
    }
    cfg = _config(config or RunDir.existing(run_dir).config_file, sets, flags)
    with answer_progress() as progress:
        m = evaluate(
            run_dir,
            data,
            output,
            cfg.eval,
            progress=progress,
            probes=None if no_probes else DEFAULT_PROBES,
            unknown=unknown,
            store=store,
        )
    _print_metrics(m)


def _print_metrics(m: dict) -> None:
    from lorafit.report import KIND_COLUMNS, METRIC_COLUMNS, kind_cells, metric_cells

    table = Table(title=f"held-out evaluation ({m['n']} prompts)")
    for col in METRIC_COLUMNS:
        table.add_column(col)
    for name in ("base", "tuned"):
        table.add_row(*metric_cells(name, m[name]))
    console.print(table)
    if kind_cells(m):
        kinds = Table(title="accuracy by question kind (held-out)")
        for col in KIND_COLUMNS:
            kinds.add_column(col, justify="left" if col == KIND_COLUMNS[0] else "right")
        for cells in kind_cells(m):
            kinds.add_row(*cells)
        console.print(kinds)
    if m.get("general_regressions"):
        console.print(
            f"[yellow]general-ability regressions:[/] {escape('; '.join(m['general_regressions']))}"
        )
    console.print(f"written to {escape(m['output'])}")


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="A training run directory.")],
    output: Annotated[Path, typer.Option("--output", help="Directory for the merged model.")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace a merged model lorafit wrote there before.")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Merge the adapter into the full-precision base: a model plain transformers loads."""
    from lorafit.merge import merge as run_merge

    r = run_merge(run_dir, output, overwrite, store)
    console.print(
        f"[green]merged[/] into {escape(r['output'])}; parity: max |logit diff| "
        f"{r['max_abs_logit_diff']:.2e} <= {r['tolerance']:.0e}"
    )


ModelArg = Annotated[
    str, typer.Argument(help="A run dir, merged dir, .gguf, embedded:..., or Hub id.")
]


@app.command()
def ask(
    model: ModelArg,
    question: Annotated[str, typer.Argument(help="The question.")],
    max_new_tokens: Annotated[int, typer.Option(help="Answer length bound.")] = 256,
) -> None:
    """Ask one question and stream the answer."""
    from lorafit.inference import chat_prompt, load_for_inference, stream_answer

    loaded = load_for_inference(model)
    stream_answer(loaded, chat_prompt(question, loaded.system_prompt), max_new_tokens)


@app.command()
def chat(
    model: ModelArg,
    max_new_tokens: Annotated[int, typer.Option(help="Answer length bound.")] = 256,
) -> None:
    """Interactive chat that keeps the conversation; /exit (or Ctrl-D) leaves, /reset forgets."""
    from lorafit.inference import chat_prompt, load_for_inference, stream_answer

    loaded = load_for_inference(model)
    history: list[dict[str, str]] = []
    console.print("[dim]/exit to leave, /reset to start over[/]")
    while True:
        try:
            question = console.input("[bold cyan]you> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if question in ("/exit", "/quit"):
            break
        if question == "/reset":
            history = []
            continue
        if not question:
            continue
        console.print("[bold green]model> [/]", end="")
        answer = stream_answer(
            loaded, chat_prompt(question, loaded.system_prompt, history), max_new_tokens
        )
        history += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@app.command()
def demo(
    output: Annotated[
        Path | None, typer.Option("--output", help="Demo directory (default runs/demo-<time>).")
    ] = None,
    config: Annotated[
        str, typer.Option(help="Config to train with: a file, or a shipped preset by name.")
    ] = "demo",
    sets: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing demo directory.")] = False,
) -> None:
    """The main job: generate data from the shipped glossary, train, evaluate, merge, show answers."""
    from lorafit.demo import run_demo
    from lorafit.paths import default_run_dir

    cfg = _config(config, sets)
    out = output or default_run_dir("demo")
    result = run_demo(cfg, out, overwrite=overwrite, console=console)
    table = Table(title="base vs tuned (held-out phrasings)", show_lines=True)
    for col in ("question", "base", "tuned"):
        table.add_column(col, overflow="fold")
    for s in result.samples:
        table.add_row(
            escape(s["prompt"]),
            ("✅ " if s["base_correct"] else "❌ ") + escape(s["base"][:160]),
            ("✅ " if s["tuned_correct"] else "❌ ") + escape(s["tuned"][:160]),
        )
    console.print(table)
    _print_metrics(result.metrics)
    if result.seed_questions:
        right = sum(q["correct"] for q in result.seed_questions)
        seed_table = Table(
            title=f"the seed's test questions: {right}/{len(result.seed_questions)} right"
        )
        seed_table.add_column("question")
        seed_table.add_column("tuned answer", overflow="fold")
        for q in result.seed_questions:
            seed_table.add_row(
                escape(q["prompt"]), ("✅ " if q["correct"] else "❌ ") + escape(q["answer"][:200])
            )
        console.print(seed_table)
    out = Path(result.metrics["output"])
    console.print(
        f"report: {escape(str(out / 'report.html'))} (also {escape(str(out / 'report.md'))})"
    )
    console.print(
        f"run: {escape(str(result.run_dir))}  merged model: {escape(str(result.merged_dir))}"
    )
    console.print(f'try it: [bold]lorafit ask {escape(str(result.merged_dir))} "What is ATP?"[/]')


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="Where to write them (default: here).")] = Path(
        "."
    ),
) -> None:
    """Start a project: editable copies of the demo config and the example glossary.

    Writes lorafit.yaml (the demo preset) and glossary.yaml (the shipped aviation glossary)
    into FOLDER; existing files are never replaced.
    """
    from lorafit.shipped import init_project

    written = init_project(folder)
    for path in written:
        console.print(f"[green]wrote[/] {escape(str(path))}")
    here = "" if folder == Path(".") else f"cd {escape(str(folder))} && "
    console.print(
        f"edit glossary.yaml, then: [bold]{here}lorafit demo --config lorafit.yaml[/] "
        "(paths in lorafit.yaml are relative to the working directory)"
    )


@app.command()
def estimate(
    config: ConfigArg = None,
    sets: SetOpt = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option("--gpu-memory", help="Budget to check against, e.g. 4GiB (GPU, else RAM)."),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="cuda or cpu (default: what this machine has).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Predict a training run's peak GPU memory and CPU RAM, and what would make it fit.

    From the model's config alone (no weights), broken down: weights, LoRA + optimizer,
    activations, logits, overhead. With --gpu-memory: whether it fits, and which settings
    would (`train --auto-fit` applies the first).
    """
    import json as json_module

    from lorafit.estimate import plan

    cfg = _config(config, sets)
    planned = plan(cfg, gpu_memory, device)
    e, fixes = planned.estimate, planned.proposals
    dev, budget = e.device, e.budget_bytes
    if as_json:
        print(json_module.dumps({**e.to_dict(), "proposals": fixes}, indent=1))
        return
    gib = 2**30
    table = Table(title=f"estimated peak memory: {escape(cfg.model.name)} on {dev}")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for name, value in (
        (f"weights ({cfg.model.quantization})", e.weights_bytes),
        (f"LoRA {e.lora_params / 1e6:.1f}M params + grads + AdamW", e.lora_bytes),
        (f"activations ({e.tokens_per_step} tokens/step)", e.activation_bytes),
        ("logits", e.logits_bytes),
        ("overhead", e.overhead_bytes),
    ):
        table.add_row(name, f"{value / gib:.2f}")
    if dev == "cuda":
        table.add_row("[bold]GPU peak[/]", f"[bold]{e.gpu_peak_bytes / gib:.2f}[/]")
    table.add_row("[bold]CPU RAM peak[/]", f"[bold]{e.cpu_peak_bytes / gib:.2f}[/]")
    console.print(table)
    for note in e.notes:
        console.print(f"[dim]{escape(note)}[/]")
    if budget is not None:
        verdict = "[green]fits[/]" if e.fits else "[red]does not fit[/]"
        console.print(f"{verdict} in {budget / gib:.2f} GiB")
        for fix in fixes[:3]:
            sets_text = " ".join(f"--set {k}={v}" for k, v in fix["set"].items())
            console.print(f"  would fit ({fix['peak_bytes'] / gib:.2f} GiB): {sets_text}")
        if fixes:
            console.print("  or: lorafit train ... --auto-fit --gpu-memory " + gpu_memory)


@export_app.command("setup")
def export_setup(
    llama_cpp: Annotated[
        bool,
        typer.Option(
            "--llama-cpp/--no-llama-cpp",
            help="Also install llama.cpp (node-llama-cpp, needs Node.js) for the round trip.",
        ),
    ] = True,
) -> None:
    """Install the GGUF converter (and llama.cpp for the round-trip check) now, not at the
    first export: each pinned by hash, into $LORAFIT_HOME/tools."""
    from lorafit.export import setup_tools

    for tool, where in setup_tools(llama_cpp).items():
        console.print(f"{tool}: {escape(where)}")


@export_app.command("gguf")
def export_gguf(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", help="The .gguf file to write.")],
    gguf_type: Annotated[
        str,
        typer.Option(
            "--type", help="f16 (same answers as the merged model) or q8_0 (half the size)."
        ),
    ] = "f16",
    overwrite: Annotated[
        bool, typer.Option(help="Replace a GGUF lorafit exported there before.")
    ] = False,
    store: StoreOpt = None,
) -> None:
    """Write a GGUF for llama.cpp / Ollama / LM Studio, plus an Ollama Modelfile beside it.

    A run directory is merged first (into RUN/merged). The file is kept only after a round
    trip: the GGUF's chat template, end token and tokenizer must match the model's, and the
    GGUF loaded back must give the merged model's greedy answers (f16: all of them).
    """
    from lorafit.export import export_gguf as run_export

    r = run_export(model, output, gguf_type, overwrite, store)
    table = Table(title=f"GGUF round trip ({r['type']}, {r['bytes'] / 2**20:.0f} MiB)")
    for col in ("check", "result"):
        table.add_column(col)
    table.add_row("chat template embedded", "✅" if r["chat_template_matches"] else "❌")
    table.add_row("end token", "✅" if r["eos_matches"] else "❌")
    table.add_row("tokenizer ids", "✅" if r["tokenizer_ids_match"] else "❌")
    table.add_row(
        "same greedy answers as merged",
        f"{r['agreement']:.0%} ({r['agreement_up_to_ties']:.0%} counting near-ties)",
    )
    if "gguf_accuracy" in r:
        table.add_row(
            "held-out accuracy merged / gguf",
            f"{r['merged_accuracy']:.0%} / {r['gguf_accuracy']:.0%}",
        )
    llama = r["llama_cpp"]
    if llama["checked"]:
        cell = (
            f"{llama['agreement']:.0%} same answers ({llama['agreement_up_to_ties']:.0%} with ties)"
        )
        if "accuracy" in llama:
            cell += f", held-out accuracy {llama['accuracy']:.0%}"
        table.add_row(f"llama.cpp ({llama['runner']})", cell)
    else:
        table.add_row("llama.cpp", escape(llama["why"]))
    console.print(table)
    for warning in r.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"[green]wrote[/] {escape(r['gguf'])} and {escape(r['modelfile'])}")
    console.print(
        f"ollama: cd {escape(str(Path(r['gguf']).parent))} && ollama create my-model -f "
        f"{escape(Path(r['modelfile']).name)}"
    )


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[
        str, typer.Option(help="Address to bind; other than loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' (default: $LORAFIT_API_KEY).",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Model name clients ask for (default: the directory name).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Largest max_tokens a request may ask for.", min=1)
    ] = 1024,
    max_context: Annotated[
        int | None,
        typer.Option(
            help="Refuse requests whose prompt plus max_tokens exceed this many tokens "
            "(default: the model's context length).",
            min=16,
        ),
    ] = None,
    max_waiting: Annotated[
        int,
        typer.Option(
            help="Requests queued or running (streams until they end); more get 503.", min=1
        ),
    ] = 64,
) -> None:
    """OpenAI-compatible API (/v1/chat/completions plain and streamed, /v1/models, /health).

    A run directory is merged first (into RUN/merged). Use it with any OpenAI client:
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").
    """
    from lorafit.serve import ServeLimits
    from lorafit.serve import serve as run_serve

    limits = ServeLimits(max_tokens=max_tokens, max_context=max_context, max_waiting=max_waiting)
    console.print(f"serving {escape(model)} on http://{host}:{port}/v1 (Ctrl-C stops)")
    run_serve(model, host, port, api_key, limits, name)


@app.command()
def ui(
    workspace: Annotated[
        Path, typer.Option(help="Folder for glossaries, data and runs (the CLI's layout).")
    ] = Path("."),
    host: Annotated[
        str, typer.Option(help="Address to bind; other than loopback needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 7860,
    token: Annotated[
        str | None,
        typer.Option(help="Token the URL must carry (made up off loopback when not given)."),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="Open the browser.")] = False,
) -> None:
    """The whole job in a local web app: glossary, plan, train, results, chat, ship, runs."""
    import uvicorn

    from lorafit.ui.app import ui_app

    web, url = ui_app(workspace, host, port, token)
    console.print(
        f"lorafit ui: [bold]{escape(url)}[/]  (workspace {escape(str(workspace.resolve()))}; Ctrl-C stops)"
    )
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(1.5, webbrowser.open, [url]).start()
    uvicorn.run(web, host=host, port=port, log_level="warning")


@runs_app.callback()
def runs(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Show at most N runs.", min=1)] = 20,
    store: StoreOpt = None,
) -> None:
    """Runs in the MLflow store, best held-out accuracy first."""
    if ctx.invoked_subcommand is not None:
        return
    from lorafit.tracking import list_runs, redact_uri, tracking_uri

    uri = tracking_uri(store)
    rows = list_runs(uri, limit)
    if not rows:
        console.print(
            f"no runs in {escape(redact_uri(uri))} yet: train one (lorafit train / lorafit demo)"
        )
        return
    table = Table(title=f"lorafit runs ({escape(redact_uri(uri))})")
    table.add_column("name", no_wrap=True)  # folded, a name broke letter by letter at 80 columns
    for col in (
        "base model",
        "data",
        "held-out acc.",
        "base acc.",
        "loss",
        "duration",
        "status",
    ):
        table.add_column(col, overflow="fold")

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    for r in rows:
        table.add_row(
            escape(r["name"] or "-"),
            escape(r["base_model"] or "-"),
            escape(r["data"]),
            pct(r["heldout_accuracy"]),
            pct(r["base_accuracy"]),
            "-" if r["final_loss"] is None else f"{r['final_loss']:.3f}",
            "-" if r["duration_s"] is None else f"{r['duration_s'] / 60:.1f} min",
            r["status"],
        )
    console.print(table)


@runs_app.command("compare")
def runs_compare(
    a: Annotated[str, typer.Argument(help="Run name, MLflow run id or run directory.")],
    b: Annotated[str, typer.Argument(help="The run to compare it with.")],
    store: StoreOpt = None,
) -> None:
    """What differs between two runs' configs and data, and their metrics side by side."""
    from lorafit.tracking import compare_runs, tracking_uri

    c = compare_runs(tracking_uri(store), a, b)
    table = Table(title="settings that differ")
    for col in ("key", *c["names"]):
        table.add_column(col, overflow="fold")
    for key, (va, vb) in c["params"].items():
        table.add_row(escape(key), escape(str(va)), escape(str(vb)))
    if not c["params"]:
        table.add_row("(none)", "", "")
    console.print(table)
    table = Table(title="metrics")
    for col in ("metric", *c["names"]):
        table.add_column(col)
    for key, (va, vb) in c["metrics"].items():
        table.add_row(key, *("-" if v is None else f"{v:.4g}" for v in (va, vb)))
    console.print(table)


@app.command()
def doctor() -> None:
    """Check Python, torch, CUDA/GPU, RAM, disk and the embedded model, with advice."""
    from lorafit.doctor import run_checks

    table = Table(title="lorafit doctor")
    for col in ("check", "value", "advice"):
        table.add_column(col, overflow="fold")
    bad = 0
    for c in run_checks():
        bad += not c.ok
        table.add_row(
            c.name,
            escape(c.value) if c.ok else f"[red]{escape(c.value)}[/]",
            "" if c.ok else escape(c.advice),
        )
    console.print(table)
    if bad:
        raise typer.Exit(1)


def main() -> None:
    _setup()
    try:
        app()
    except LorafitError as e:
        # the message names files and values: print it as text, never as rich markup
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(str(e))}", highlight=False
        )
        sys.exit(2)
