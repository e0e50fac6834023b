"""Real llama.cpp for the GGUF round trip: the answers a user's llama.cpp, Ollama or LM Studio
computes, not transformers' reading of the file.

Two runners, whichever is there:
- node-llama-cpp 3.21.1: prebuilt llama.cpp (release v0.4.0) for Linux x64, CPU, no compiling.
  ``lorafit export setup-llama-cpp`` installs it with ``npm ci`` from the lockfile lorafit ships
  (every package pinned by its integrity hash) into ``$LORAFIT_HOME/tools``; it needs Node 18+.
- llama-cpp-python, where the user installed it.

lorafit renders each prompt with the model's own chat template and hands llama.cpp the text
with special tokens parsed, never llama.cpp's own chat wrappers: both engines see the same
token ids. Decoding is greedy; answers end at the model's end-of-generation tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.paths import lorafit_home
from lorafit.shipped import shipped

NODE_PACKAGE = "node-llama-cpp 3.21.1"
RUNNER = "answer.mjs"
THREADS = 1  # measured: 2 threads spin and slow down 10x when the other core is busy


def node_dir() -> Path:
    return lorafit_home() / "tools" / "node-llama-cpp-3.21.1"


def install_node_runner() -> Path:
    """``npm ci`` the pinned node-llama-cpp into the tools folder (once)."""
    target = node_dir()
    if (target / "node_modules" / "node-llama-cpp").is_dir():
        return target
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise LorafitError(
            f"installing {NODE_PACKAGE} needs Node.js 18+ and npm on PATH; install them, or "
            "`pip install llama-cpp-python` for the same check"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".node-llama-cpp-", dir=target.parent))
    for name in ("package.json", "package-lock.json", RUNNER):
        shutil.copy(shipped(f"llama_cpp/{name}"), tmp / name)
    done = subprocess.run(
        [npm, "ci", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"],
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LorafitError(f"npm could not install {NODE_PACKAGE}: {done.stderr.strip()[-800:]}")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def runner() -> str | None:
    """Which llama.cpp this machine can run: "node-llama-cpp", "llama-cpp-python" or None."""
    if shutil.which("node") and (node_dir() / "node_modules" / "node-llama-cpp").is_dir():
        return "node-llama-cpp"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return "llama-cpp-python"


def answer(gguf: Path, texts: list[str], max_tokens: int) -> list[tuple[str, bool, list[int]]]:
    """Greedy answers of llama.cpp to chat-rendered prompts: [(text, stopped by itself, the
    generated token ids, with the end token that stopped it)]."""
    which = runner()
    if which == "node-llama-cpp":
        return _node(gguf, texts, max_tokens)
    if which == "llama-cpp-python":
        return _python(gguf, texts, max_tokens)
    raise LorafitError("no llama.cpp runner: run `lorafit export setup-llama-cpp`")


def _node(gguf: Path, texts: list[str], max_tokens: int) -> list[tuple[str, bool, list[int]]]:
    folder = node_dir()
    script = folder / RUNNER
    wanted = shipped(f"llama_cpp/{RUNNER}").read_bytes()
    if not script.is_file() or script.read_bytes() != wanted:  # the runner lorafit ships
        script.write_bytes(wanted)
    request = {"model": str(gguf.resolve()), "prompts": texts, "max_tokens": max_tokens}
    request["threads"] = THREADS
    done = subprocess.run(
        [shutil.which("node") or "node", str(script)],
        cwd=folder,
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise LorafitError(f"llama.cpp (node-llama-cpp) failed: {done.stderr.strip()[-800:]}")
    answers = json.loads(done.stdout)["answers"]
    return [
        (a["text"].strip(), a["stopped"], a["tokens"] + ([a["stop_token"]] if a["stopped"] else []))
        for a in answers
    ]


def _python(gguf: Path, texts: list[str], max_tokens: int) -> list[tuple[str, bool, list[int]]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=THREADS, verbose=False)
    out = []
    for text in texts:
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        reply = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0)
        choice = reply["choices"][0]
        stopped = choice["finish_reason"] == "stop"
        ids = llm.tokenize(choice["text"].encode(), add_bos=False, special=True)
        out.append((choice["text"].strip(), stopped, ids + ([llm.token_eos()] if stopped else [])))
    return out
