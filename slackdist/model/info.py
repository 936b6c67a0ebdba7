"""What a model folder tells inference: the system prompt training used, its workspace, the chat template.

Every model folder `slackdist train` writes (the output folder, `best/`, each `checkpoints/step-N/`)
holds `slackdist_inference.json` next to the resolved `slackdist_config.yaml`, and `slackdist merge`
copies both. So chat, eval and serve prompt a model exactly as training did without reading the
training data folder (`report.json`) or importing the data pipeline: the prompts are filled in at
training time (`slackdist.train.checkpoint.model_info`), with `{persona}` left open for answering as
someone else (`chat --as NAME`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from slackdist.config import DEFAULT_SYSTEM_PROMPT, PERSONA_SYSTEM_PROMPT
from slackdist.errors import SlackdistError, first_line
from slackdist.files import write_json_atomic

CONFIG_FILE = "slackdist_config.yaml"
"""The resolved training config, in every model folder."""
INFO_FILE = "slackdist_inference.json"
"""`ModelInfo`, in every model folder."""
PERSONA_PLACEHOLDER = "{persona}"
DEFAULT_CHANNEL = "general"
UNKNOWN_WORKSPACE = "Slack"


@dataclass(frozen=True)
class ModelInfo:
    """How to prompt a model the way it was trained."""

    workspace: str
    """The workspace name in training's system prompts."""
    system_prompt: str
    """Training's system prompt for #general, as nobody in particular."""
    persona_system_prompt: str
    """The same prompt for answering as someone: `{persona}` is filled in when asked."""
    persona: str | None = None
    """Who the model was trained to answer as (persona mode: "Ann", or "Ann or Bob" for several), else None."""
    chat_template: str = "llama3"
    """The chat template the tokenizer renders (`slackdist.model.template.chat_template_name`)."""
    personas: list[str] = field(default_factory=list)
    """Each person of `prepare --as`, as training's prompts name them."""

    def system_prompt_for(self, persona: str | None = None) -> str:
        """Training's system prompt for #general, answering as `persona` (default: the trained persona).

        One of several trained personas (`chat --as Ann`) gets the prompt training gave the records in
        which only Ann answers, with her name spelled as training spelled it.
        """
        persona = persona or self.persona
        if not persona:
            return self.system_prompt
        spelled = {p.casefold(): p for p in self.personas}
        persona = spelled.get(persona.strip().lstrip("@").casefold(), persona)
        return self.persona_system_prompt.replace(PERSONA_PLACEHOLDER, persona)

    @classmethod
    def untrained(cls) -> ModelInfo:
        """For a folder `slackdist train` did not write: the stock prompt of an unnamed workspace."""

        def stock(template: str) -> str:
            return template.replace("{workspace}", UNKNOWN_WORKSPACE).replace("{channel}", DEFAULT_CHANNEL)

        return cls(UNKNOWN_WORKSPACE, stock(DEFAULT_SYSTEM_PROMPT), stock(PERSONA_SYSTEM_PROMPT))


def write_model_info(info: ModelInfo, folder: str | os.PathLike[str]) -> Path:
    """Write FOLDER/slackdist_inference.json (atomically); returns its path."""
    path = Path(folder) / INFO_FILE
    write_json_atomic(path, asdict(info))
    return path


def read_model_info(folder: str | os.PathLike[str]) -> ModelInfo | None:
    """FOLDER/slackdist_inference.json, or None when the folder has none.

    Raises:
        SlackdistError: the file is unreadable or lacks a field.
    """
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ModelInfo(**{f.name: data[f.name] for f in fields(ModelInfo) if f.name in data})
    except (OSError, ValueError, TypeError) as e:
        raise SlackdistError(f"{path}: unreadable model info ({first_line(e)})") from None
