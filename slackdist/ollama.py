"""The Ollama `Modelfile` written next to an exported GGUF: chat template, stop tokens, system prompt, sampling.

Ollama renders prompts with Go templates, not Jinja: it hands the template `.System` (the system messages
joined) and `.Messages`, and its tokenizer adds the begin-of-text token itself when the GGUF says so. Each
chat format below is a Go template plus the same layout written as a Python function; the export picks the
format whose layout equals what the model's own Jinja template renders for probe conversations, so a
Modelfile never carries a template that disagrees with training. (tests/test_gguf.py also runs each Go
template through Go's text/template, the engine Ollama uses, where a Go toolchain is installed.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from slackdist.errors import SlackdistError
from slackdist.gguf_vocab import adds_bos
from slackdist.model.info import INFO_FILE, read_model_info

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from slackdist.config import Config

Messages = list[dict[str, str]]

LLAMA3_GO_TEMPLATE = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

CHATML_GO_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}
{{- end }}<|im_start|>assistant
"""


def _system_first(messages: Messages) -> tuple[str, Messages]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return system, [m for m in messages if m["role"] != "system"]


def _llama3_layout(messages: Messages) -> str:
    system, turns = _system_first(messages)
    head = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    body = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in turns
    )
    return head + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _chatml_layout(messages: Messages) -> str:
    system, turns = _system_first(messages)
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in turns)
    return head + body + "<|im_start|>assistant\n"


@dataclass(frozen=True)
class OllamaFormat:
    """One chat format as Ollama needs it."""

    name: str
    template: str
    """The Go template (`TEMPLATE`)."""
    stop: tuple[str, ...]
    """`PARAMETER stop` strings: end of turn, and headers a runaway reply would start."""
    layout: Callable[[Messages], str]
    """What `template` renders for system-first messages plus the assistant header, as plain Python."""


FORMATS = (
    OllamaFormat(
        "llama3", LLAMA3_GO_TEMPLATE, ("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"), _llama3_layout
    ),
    OllamaFormat("chatml", CHATML_GO_TEMPLATE, ("<|im_end|>", "<|im_start|>"), _chatml_layout),
)

PROBES: tuple[Messages, ...] = (
    [
        {"role": "system", "content": "You are a member of the team. This conversation is from #general."},
        {"role": "user", "content": "Is the deploy done?"},
        {"role": "assistant", "content": "Yes, it went out at 3pm."},
        {"role": "user", "content": "Thanks! Any errors?"},
    ],
    [{"role": "user", "content": "Lunch today?"}],
)


def jinja_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """The model's own chat template rendered with the generation prompt, minus a begin-of-text token that
    the tokenizer adds by itself (llama.cpp and Ollama add it from the GGUF's add-bos flag)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos) :]
    return text


def detect_format(tokenizer: PreTrainedTokenizerBase, *, with_system: bool = False) -> OllamaFormat | None:
    """The format whose layout equals the tokenizer's chat template on every probe, or None.

    Args:
        tokenizer: the exported model's tokenizer, with its chat template.
        with_system: the Modelfile has a SYSTEM line, so Ollama always sends a system prompt: only probes
            with one must agree (a template that inserts a default system prompt, as SmolLM2's does, then
            still matches).
    """
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    probes = [p for p in PROBES if p[0]["role"] == "system"] if with_system else list(PROBES)
    rendered = [jinja_prompt(tokenizer, probe) for probe in probes]
    for fmt in FORMATS:
        if all(fmt.layout(probe) == text for probe, text in zip(probes, rendered, strict=True)):
            return fmt
    return None


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise SlackdistError(f'{what} contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile_text(
    gguf_file: str,
    *,
    fmt: OllamaFormat | None,
    system: str | None,
    parameters: dict[str, float],
) -> str:
    """The Modelfile: FROM, TEMPLATE, SYSTEM, PARAMETER lines.

    Raises:
        SlackdistError: the system prompt contains the Modelfile's quote `\"\"\"`.
    """
    lines = [
        "# Written by `slackdist export`. Create the model with: ollama create team -f Modelfile",
        f"FROM ./{gguf_file}",
    ]
    if fmt is not None:
        lines.append(f"TEMPLATE {_quoted(fmt.template, 'the template')}")
    if system:
        lines.append(f"SYSTEM {_quoted(system, 'the system prompt')}")
    if fmt is not None:
        lines += [f'PARAMETER stop "{stop}"' for stop in fmt.stop]
    lines += [f"PARAMETER {key} {value:g}" for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def training_system_prompt(model_dir: Path) -> str | None:
    """The system prompt training used for #general, from the `slackdist_inference.json` that every
    folder `slackdist train` and `slackdist merge` write; None without one.

    Raises:
        SlackdistError: the file is there but unreadable.
    """
    info = read_model_info(model_dir)
    return None if info is None else info.system_prompt_for()


@dataclass(frozen=True)
class Modelfile:
    text: str
    format: str | None
    note: str | None
    """What the user should know (no template matched, no system prompt found)."""


def build_modelfile(gguf_name: str, *, folder: Path, model_dir: Path, cfg: Config) -> Modelfile:
    """The Modelfile for a GGUF file that sits beside it (built before the GGUF is written, so a problem here
    leaves nothing behind).

    Args:
        gguf_name: the GGUF file's name; FROM points at it relatively.
        folder: the merged model folder being exported (its tokenizer decides the template).
        model_dir: the folder the user named (its training config gives the system prompt).
        cfg: `export.system` overrides the training system prompt; `chat` gives the sampling parameters.

    Returns:
        The Modelfile's text, the chat format used and a note for the user, if any.

    Raises:
        SlackdistError: an invalid training config, or a system prompt a Modelfile cannot quote.
    """
    from slackdist.model.load import load_tokenizer

    system = cfg.export.system or training_system_prompt(model_dir)
    fmt = detect_format(load_tokenizer(str(folder)), with_system=bool(system))
    notes = []
    if fmt is None:
        notes.append(
            "note: the model's chat template is none of "
            f"{', '.join(f.name for f in FORMATS)}: the Modelfile has no TEMPLATE (Ollama will guess one)"
        )
    if not system:
        notes.append(
            f"note: no {INFO_FILE} in {model_dir}: the Modelfile has no SYSTEM line (pass --system TEXT)"
        )
    parameters = {
        "temperature": cfg.chat.temperature,
        "top_p": cfg.chat.top_p,
        "repeat_penalty": cfg.chat.repetition_penalty,
    }
    text = modelfile_text(gguf_name, fmt=fmt, system=system, parameters=parameters)
    return Modelfile(text, fmt.name if fmt else None, "\n".join(notes) or None)
