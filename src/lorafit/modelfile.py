"""An Ollama Modelfile for an exported GGUF: the chat template as Ollama's Go template (only
where lorafit can check it renders what the model's own template renders), the system prompt
the model was trained with, the end token, greedy decoding.

Ollama templates are Go templates. A few chat formats cover most small chat models; each is
written twice, as Ollama's template and as the Python rendering of it, and used only when that
rendering equals what the model's own (Jinja) chat template produces.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


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
