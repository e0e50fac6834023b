"""The app's actions (POST) and live streams (server-sent events), each a thin call into a
lorafit stage or a `lorafit` subprocess in the workspace."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import yaml
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafit.data.generate import MANIFEST, write_generated
from lorafit.data.glossary import check_glossary, load_glossary
from lorafit.errors import LorafitError
from lorafit.rundir import read_json, write_json
from lorafit.ui.workspace import GLOSSARY_SUFFIXES, metrics_rows, safe_name

CHAT_WAIT_S = 10  # a question asked while another is answered waits this long, then gets 503


def _save_glossary(ui, name: str, text: str) -> dict:
    """Parse first (nothing written for a file that is not a glossary), then write."""
    name = safe_name(name, "file name")
    if not name.endswith(GLOSSARY_SUFFIXES):
        raise LorafitError(f"{name}: a glossary is a .yaml, .csv or .json file")
    glossary, problems = check_glossary(name, text)
    whole_file = [p.message for p in problems if p.index < 0]
    if whole_file:
        raise LorafitError(whole_file[0])
    ui.ws.glossary_path(name).write_text(text, encoding="utf-8")
    return {
        "name": name,
        "terms": len(glossary.terms) if glossary else None,
        "problems": len(problems),
    }


async def upload(ui, request: Request):
    raw = await ui.body(request)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LorafitError(
            "the file is not UTF-8 text; save it as UTF-8 and upload again"
        ) from None
    return _save_glossary(ui, request.query_params.get("name", ""), text)


async def paste(ui, request: Request):
    data = await ui.json(request)
    return _save_glossary(ui, str(data.get("name", "")), str(data.get("text", "")))


async def save(ui, request: Request):
    """The edited table, written back as YAML (the editor's rows, blank optional fields out)."""
    data = await ui.json(request)
    name = safe_name(str(data.get("name", "")), "glossary")
    terms = []
    for row in data.get("terms") or []:
        if not isinstance(row, dict) or not any(str(v).strip() for v in row.values()):
            continue
        entry = {
            k: str(row.get(k, "")).strip() for k in ("term", "expansion", "definition", "category")
        }
        terms.append({k: v for k, v in entry.items() if v or k in ("term", "definition")})
    doc = {"terms": terms}
    if str(data.get("domain", "")).strip():
        doc = {"domain": str(data["domain"]).strip(), **doc}
    yaml_name = name.rsplit(".", 1)[0] + ".yaml"
    return _save_glossary(ui, yaml_name, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


async def generate(ui, request: Request):
    from lorafit.config import load_config
    from lorafit.data.check import check_files

    data = await ui.json(request)
    name = safe_name(str(data.get("glossary", "")), "glossary")
    glossary = load_glossary(ui.ws.glossary_path(name))
    config = load_config("demo")
    out = ui.ws.data_dir(name)

    def work():
        write_generated(
            glossary,
            out,
            unknown_train=config.data.unknown_terms,
            overwrite=True,  # only files an earlier generate wrote (it refuses others)
            kinds=config.data.kinds,
            eval_kinds=config.data.eval_kinds,
        )
        [report] = check_files([out / "train.jsonl"], config.model.name, config.data.max_length)
        manifest = read_json(out / MANIFEST)
        manifest["tokens"] = round(report.mean_tokens * report.rows)
        write_json(out / MANIFEST, manifest)
        return manifest

    return await asyncio.to_thread(work)


def _settings(data: dict) -> list[str]:
    sets = {
        "model.name": str(data.get("model") or "embedded:smollm2-135m-instruct"),
        "model.quantization": str(data.get("quantization") or "none"),
        "train.epochs": float(data.get("epochs") or 2),
        "lora.r": int(data.get("rank") or 16),
        "data.replay": float(data.get("replay") if data.get("replay") is not None else 0.2),
    }
    sets["lora.alpha"] = 2 * sets["lora.r"]
    if data.get("max_steps"):
        sets["train.max_steps"] = int(data["max_steps"])
    return [f"{k}={v}" for k, v in sets.items()]


async def estimate(ui, request: Request):
    from lorafit.config import load_config
    from lorafit.estimate import plan

    data = await ui.json(request)
    config = load_config("demo", _settings(data))

    def work():
        import psutil

        e = plan(config).estimate
        budget = psutil.virtual_memory().available if e.device == "cpu" else None
        peak = e.cpu_peak_bytes if e.device == "cpu" else e.gpu_peak_bytes
        if budget is None:
            import torch

            budget = torch.cuda.get_device_properties(0).total_memory
        fits = peak <= budget
        where = "free RAM" if e.device == "cpu" else "GPU memory"
        verdict = f"Estimated peak {peak / 2**30:.1f} GiB of {budget / 2**30:.1f} GiB {where}: "
        verdict += "fits." if fits else "does not fit: try 4bit quantization or a smaller model."
        return {"fits": fits, "verdict": verdict}

    return await asyncio.to_thread(work)


async def start_training(ui, request: Request, resume: bool = False):
    from lorafit.config import dump_config, load_config

    data = await ui.json(request)
    run = safe_name(str(data.get("run", "")), "run")
    if resume:
        config_file = ui.ws.inside(f"configs/{run}.yaml")
        if not config_file.is_file():
            raise LorafitError(f"run {run!r} was not started from this app; resume it with the CLI")
        args = ["train", f"configs/{run}.yaml", "--output", f"runs/{run}", "--resume"]
        return {"run": run, "job": ui.ws.start("train", run, args).id}
    glossary = safe_name(str(data.get("glossary", "")), "glossary")
    folder = ui.ws.data_dir(glossary)
    if not (folder / "train.jsonl").is_file():
        raise LorafitError(f"generate the questions of {glossary} first (Knowledge)")
    if ui.ws.inside(f"runs/{run}").exists():
        raise LorafitError(f"run {run!r} exists: choose another name")
    rel = folder.relative_to(ui.ws.root)
    config = load_config("demo", _settings(data) + [f"data.glossary=glossaries/{glossary}"])
    ui.ws.inside(f"configs/{run}.yaml").write_text(dump_config(config))
    args = ["train", f"configs/{run}.yaml", "--output", f"runs/{run}"]
    args += ["--data", f"{rel}/train.jsonl", "--eval-data", f"{rel}/eval.jsonl"]
    job = ui.ws.start("train", run, args, extra={"glossary": glossary})
    return {"run": run, "job": job.id}


async def stop_training(ui, request: Request):
    data = await ui.json(request)
    run = safe_name(str(data.get("run", "")), "run")
    jobs = [j for j in ui.ws.running("train") if j.run == run]
    if not jobs:
        raise LorafitError(f"run {run!r} is not training")
    ui.ws.stop(jobs[0])
    return {"stopping": jobs[0].id}


async def train_events(ui, request: Request):
    run = safe_name(request.query_params.get("run", ""), "run")
    folder = ui.ws.run_dir(run)

    async def events():
        while not await request.is_disconnected():
            rows = metrics_rows(folder)
            status, job, error = ui.ws.train_status(run)
            running = bool(job and job.alive())
            state = {
                "status": status,
                "error": error,
                "running": running,
                "train": [[r["step"], r["loss"]] for r in rows if "loss" in r],
                "eval": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r],
                "log": ui.ws.tail(job, 12) if job else "",
                **_progress(folder, rows),
            }
            yield f"data: {json.dumps(state)}\n\n"
            if not running and state["status"] in ("completed", "failed", "interrupted"):
                break
            await asyncio.sleep(1.0)

    return StreamingResponse(events(), media_type="text/event-stream")


def _progress(folder, rows) -> dict:
    losses = [r for r in rows if "loss" in r]
    last = losses[-1] if losses else {}
    step, speed = last.get("step", 0), last.get("tokens_per_s")
    state_file = max(folder.checkpoints_dir.glob("checkpoint-*/trainer_state.json"), default=None)
    max_steps = None
    if state_file:
        max_steps = json.loads(state_file.read_text()).get("max_steps")
    eta = None
    if max_steps and step and len(losses) > 1:
        elapsed = time.time() - folder.metrics_file.stat().st_ctime
        eta = max(0.0, elapsed / step * (max_steps - step))
    return {
        "step": step,
        "max_steps": max_steps,
        "loss": last.get("loss"),
        "tokens_per_s": speed,
        "eta_s": eta,
    }


async def start_eval(ui, request: Request):
    data = await ui.json(request)
    run = safe_name(str(data.get("run", "")), "run")
    folder = ui.ws.run_dir(run)
    if not folder.info_file.is_file():
        raise LorafitError(f"run {run!r} has not started yet: nothing to evaluate")
    info = folder.info()
    eval_file = ((info.get("data") or {}).get("eval") or {}).get("path")
    if not eval_file:
        raise LorafitError(f"run {run!r} has no held-out data to evaluate on")
    args = ["eval", f"runs/{run}", "--data", eval_file]
    unknown = ui.ws.root / eval_file.rsplit("/", 1)[0] / "unknown.jsonl"
    if unknown.is_file():
        args += ["--unknown", str(unknown.relative_to(ui.ws.root))]
    return {"job": ui.ws.start("eval", run, args).id}


async def start_export(ui, request: Request):
    data = await ui.json(request)
    run = safe_name(str(data.get("run", "")), "run")
    kind = str(data.get("type", "f16"))
    if kind not in ("f16", "q8_0"):
        raise LorafitError("type: f16 or q8_0")
    args = [
        "export",
        "gguf",
        f"runs/{run}",
        "--output",
        f"exports/{run}-{kind}.gguf",
        "--type",
        kind,
    ]
    if ui.ws.inside(f"exports/{run}-{kind}.gguf").exists():
        args.append("--overwrite")  # only replaces a GGUF lorafit exported (it checks)
    return {"job": ui.ws.start("export", run, args).id}


async def chat(ui, request: Request):
    """One answer, streamed as server-sent events: the tuned model, or the base one (the same
    weights with the adapter switched off)."""
    from transformers import TextIteratorStreamer

    from lorafit.inference import chat_prompt, load_for_inference

    data = await ui.json(request)
    run = safe_name(str(data.get("run", "")), "run")
    question = str(data.get("question", "")).strip()[:2000]
    if not question:
        raise LorafitError("ask a question")
    # wait a little for the answer before: the page asks the base model as soon as the tuned
    # one's stream ends, a moment before that generation's thread lets go of the lock
    if not await take_lock(ui.chat_lock, CHAT_WAIT_S):
        return JSONResponse({"error": "busy answering another question; try again"}, 503)
    try:
        if run not in ui.loaded:
            ui.loaded.clear()  # one model in memory at a time
            ui.loaded[run] = await asyncio.to_thread(load_for_inference, ui.ws.run_dir(run).path)
    except BaseException:
        ui.chat_lock.release()
        raise
    loaded = ui.loaded[run]
    tok = loaded.tokenizer
    text = tok.apply_chat_template(
        chat_prompt(question, loaded.system_prompt), add_generation_prompt=True, tokenize=False
    )
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)

    def answer():
        import contextlib

        import torch

        try:
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            off = (
                loaded.model.disable_adapter()
                if data.get("model") == "base"
                else contextlib.nullcontext()
            )
            with torch.no_grad(), off:
                loaded.model.generate(
                    **enc,
                    max_new_tokens=128,
                    do_sample=False,
                    streamer=streamer,
                    pad_token_id=tok.pad_token_id,
                )
        finally:
            ui.chat_lock.release()

    threading.Thread(target=answer, daemon=True).start()
    return StreamingResponse(_stream(streamer), media_type="text/event-stream")


async def take_lock(lock, seconds: float) -> bool:
    """``lock`` within ``seconds``, polled from the event loop: a request cancelled while it
    waits (the tab closed) holds nothing. A blocking acquire in a worker thread would take the
    lock after its request was gone and never give it back."""
    deadline = time.monotonic() + seconds
    while not lock.acquire(blocking=False):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _stream(streamer):
    loop = asyncio.get_running_loop()
    iterator = iter(streamer)
    while True:
        piece = await loop.run_in_executor(None, next, iterator, None)
        if piece is None:
            break
        yield f"data: {json.dumps({'text': piece})}\n\n"
