"""The chat formats slackdist trains and prompts with: one Jinja template per model family.

Each template renders exactly the turns its family's own template renders for plain system / user /
assistant messages (no tools, no reasoning blocks, no default system prompt of its own: our records
always bring one), trims each message's content as Meta's Llama 3 template does, and marks each
assistant turn's content and its closing end-of-turn token with `{% generation %}`, so transformers
can tell which tokens carry the loss. Control tokens are written as literals, never built from pieces
(`'<|' + role + '|>'`), so `slackdist.model.template` can tell the template's control tokens from
text a user typed.

| name | families | one turn |
|---|---|---|
| llama3 | Llama 3.x | `<|start_header_id|>user<|end_header_id|>\\n\\nHi<|eot_id|>` |
| chatml | Qwen2/2.5/3, SmolLM2 | `<|im_start|>user\\nHi<|im_end|>\\n` |
| mistral | Mistral, Mixtral | `[INST] Hi[/INST] Hello</s>` (system prompt in the last user turn) |
| gemma | Gemma 2/3 | `<start_of_turn>user\\nHi<end_of_turn>\\n` (system prompt in the first user turn) |
| phi3 | Phi-3/3.5, Phi-4-mini | `<|user|>\\nHi<|end|>\\n` |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    """One family's chat template and the tokens it depends on."""

    name: str
    """The `model.chat_template` value that selects it (and what `slackdist_inference.json` records)."""
    template: str
    """Jinja template with generation markers around each assistant turn's content and end token."""
    control_tokens: tuple[str, ...]
    """Tokens the template writes; each must be a single token of the vocabulary."""
    stop_tokens: tuple[str, ...]
    """Tokens that end a reply, the end-of-turn token first (generation stops on any of them)."""
    message_overhead: int
    """Tokens one message costs besides its content (prepare's estimate when it has no tokenizer)."""
    pad_tokens: tuple[str, ...] = ()
    """The family's pad tokens, preferred in this order (else the eos token pads)."""


LLAMA3 = ChatFormat(
    name="llama3",
    # Meta's Llama 3 template for plain turns, without the 3.1+ "Cutting Knowledge Date" / tools lines.
    template=(
        "{{- '<|begin_of_text|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- message['content'] | trim + '<|eot_id|>' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
    ),
    control_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    message_overhead=5,  # header start, role, header end, "\n\n", <|eot_id|>
    pad_tokens=("<|finetune_right_pad_id|>",),
)

CHATML = ChatFormat(
    name="chatml",
    template=(
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- message['content'] | trim + '<|im_end|>' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- message['content'] | trim + '<|im_end|>' -}}"
        "{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    control_tokens=("<|im_start|>", "<|im_end|>"),
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    message_overhead=5,  # <|im_start|>, role, "\n", <|im_end|>, "\n"
    pad_tokens=("<|endoftext|>",),
)

PHI3 = ChatFormat(
    name="phi3",
    template=(
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{{- '<|system|>\\n' -}}"
        "{%- elif message['role'] == 'user' -%}{{- '<|user|>\\n' -}}"
        "{%- else -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- message['content'] | trim + '<|end|>' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- message['content'] | trim + '<|end|>' -}}"
        "{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    ),
    control_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    stop_tokens=("<|end|>", "<|endoftext|>"),
    message_overhead=4,  # <|role|>, "\n", <|end|>, "\n" (Phi-3's tokens swallow the newlines after them)
    pad_tokens=("<|endoftext|>",),
)

# Mistral v0.3's template: "[INST] user[/INST] assistant</s>", the system prompt written before the
# LAST user message (Mistral has no system role; mistral-common does the same). Unlike the hub
# template, which writes it only when that user message is the very last message (so a training
# record ending on an assistant turn would lose it), the system prompt is always written.
MISTRAL = ChatFormat(
    name="mistral",
    template=(
        "{{- '<s>' -}}"
        "{%- set ns = namespace(system='', last_user=-1) -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{%- set ns.system = (ns.system + '\\n\\n' if ns.system else '') + message['content'] | trim -%}"
        "{%- elif message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.system and ns.last_user < 0 -%}{{- '[INST] ' + ns.system + '[/INST]' -}}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.index0 == ns.last_user and ns.system -%}"
        "{{- '[INST] ' + ns.system + '\\n\\n' + message['content'] | trim + '[/INST]' -}}"
        "{%- else -%}{{- '[INST] ' + message['content'] | trim + '[/INST]' -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- ' ' + message['content'] | trim + '</s>' -}}{%- endgeneration -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
    control_tokens=("<s>", "</s>"),  # [INST] / [/INST] are control tokens from v0.3 on, text before
    stop_tokens=("</s>",),
    message_overhead=4,  # [INST] + space / [/INST] on user turns, space + </s> on assistant turns
)

# Gemma 3's template (Gemma 2 has no system role and refuses one): the system prompt opens the first
# user turn; the assistant's role is "model".
GEMMA = ChatFormat(
    name="gemma",
    template=(
        "{{- '<bos>' -}}"
        "{%- set ns = namespace(system='') -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.system = messages[0]['content'] | trim -%}{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- if ns.system and (not loop_messages or loop_messages[0]['role'] != 'user') -%}"
        "{{- '<start_of_turn>user\\n' + ns.system + '<end_of_turn>\\n' -}}{%- set ns.system = '' -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- '<start_of_turn>model\\n' -}}"
        "{%- generation -%}{{- message['content'] | trim + '<end_of_turn>' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- '<start_of_turn>user\\n' -}}"
        "{%- if loop.first and ns.system -%}{{- ns.system + '\\n\\n' -}}{%- endif -%}"
        "{{- message['content'] | trim + '<end_of_turn>' -}}"
        "{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
    ),
    control_tokens=("<bos>", "<start_of_turn>", "<end_of_turn>"),
    stop_tokens=("<end_of_turn>", "<eos>"),
    message_overhead=5,  # <start_of_turn>, role, "\n", <end_of_turn>, "\n"
    pad_tokens=("<pad>",),
)

# For a model of no family we know (with a warning naming `model.chat_template`): plain-text
# headers, the model's own bos / eos around the turns. No token here belongs to any family.
GENERIC = ChatFormat(
    name="generic",
    template=(
        "{{- bos_token if bos_token else '' -}}"
        "{%- for message in messages -%}"
        "{{- '### ' + message['role'] + ':\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- message['content'] | trim + eos_token -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- message['content'] | trim + eos_token -}}"
        "{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '### assistant:\\n' -}}"
        "{%- endif -%}"
    ),
    control_tokens=(),
    stop_tokens=(),
    message_overhead=6,  # "###", role, ":\n", eos, "\n"
)

CHAT_FORMATS: dict[str, ChatFormat] = {f.name: f for f in (LLAMA3, CHATML, MISTRAL, GEMMA, PHI3, GENERIC)}
"""Every format by name; `generic` is never chosen for a family we know."""
