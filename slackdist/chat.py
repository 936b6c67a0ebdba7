"""`slackdist chat` (and `python main.py --test`): talk to the tuned model in the terminal.

Type a message, the reply streams token by token. The conversation keeps its history,
trimmed from the oldest turns to fit the context. `exit`, `quit`, Ctrl+D or Ctrl+C at
the prompt leave (exit code 0); Ctrl+C during a reply stops that reply. Commands:
`/reset`, `/system TEXT`, `/compare [TEXT]`, `/help`. `--prompt TEXT` answers once and
exits; when stdin is not a terminal, each line of it is a message (replies only on
stdout, same history rules).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from slackdist.config import Config
from slackdist.errors import SlackdistError
from slackdist.generate import (
    GenerationSettings,
    ReplyStats,
    context_limit,
    stream_reply,
    trim_history,
    warm_up,
)
from slackdist.model.load import InferenceModel, load_for_inference, merge_in_memory

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")
HELP = """\
  /reset          forget the conversation (the system prompt stays)
  /system [TEXT]  show the system prompt, or set it to TEXT (and reset)
  /compare [TEXT] answer TEXT (default: your last message) with the base model, then the tuned model
  /help           this list
  exit, quit, Ctrl+D   leave; Ctrl+C stops a reply, or leaves at the prompt"""


@dataclass
class ChatSession:
    """One conversation with a loaded model: history, system prompt and how replies are shown."""

    im: InferenceModel
    settings: GenerationSettings
    system: str
    label: str = "bot"
    out: TextIO = field(default_factory=lambda: sys.stdout)
    interactive: bool = True
    """Label replies and show the token-count line after each one (a terminal); else replies only."""
    history: list[dict[str, str]] = field(default_factory=list)
    """user / assistant turns, oldest first (the system prompt is kept apart)."""

    # ------------------------------------------------------------ replies

    def ask(self, text: str) -> str:
        """Answer `text` with the tuned model, keeping it and the reply in the history.

        Raises:
            PromptTooLongError: the message alone does not fit the context.
        """
        messages = self._fit([*self.history, {"role": "user", "content": text}])
        answer = self._show_reply(messages, self.label)
        self.history = [*messages[1:], {"role": "assistant", "content": answer}]
        return answer

    def compare(self, text: str | None) -> None:
        """Answer with the base model (adapter disabled), then with the tuned model, labelled.

        With `text`, it is a new message and the tuned answer joins the history; without,
        the last message is answered again and the history stays as it is.

        Raises:
            SlackdistError: the model has no adapter (a merged model).
        """
        if self.im.merged_in_memory:
            raise SlackdistError(
                "/compare needs the base model: the adapter was merged in memory for fast replies "
                "(start chat with --merge-adapter off to compare)"
            )
        if not hasattr(self.im.model, "disable_adapter"):
            raise SlackdistError(
                "/compare needs an adapter model; this is a merged model (no base to compare)"
            )
        if text:
            messages = self._fit([*self.history, {"role": "user", "content": text}])
        else:
            last_user = max((i for i, m in enumerate(self.history) if m["role"] == "user"), default=None)
            if last_user is None:
                self._note("nothing to compare yet: send a message first, or use /compare TEXT")
                return
            messages = self._fit(self.history[: last_user + 1])
        self._show_reply(messages, "base", adapter=False, labelled=True)
        answer = self._show_reply(messages, "tuned", labelled=True)
        if text:
            self.history = [*messages[1:], {"role": "assistant", "content": answer}]

    def reset(self, system: str | None = None) -> None:
        """Forget the history; optionally set a new system prompt."""
        self.history = []
        if system is not None:
            self.system = system

    def _fit(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        limit = context_limit(self.im, self.settings)
        messages = [{"role": "system", "content": self.system}, *turns]
        return trim_history(self.im.tokenizer, messages, limit, min(self.settings.max_new_tokens, limit // 2))

    def _show_reply(
        self, messages: list[dict[str, str]], label: str, *, adapter: bool = True, labelled: bool = False
    ) -> str:
        """Stream one reply to `out` (after `label> ` on a terminal, or when `labelled`).

        Ctrl+C (SIGINT) meanwhile ends the reply, not the program.
        """
        stats = ReplyStats()
        stop = threading.Event()
        pieces = stream_reply(self.im, messages, self.settings, stop_event=stop, adapter=adapter, stats=stats)
        if self.interactive or labelled:
            self.out.write(f"{label}> ")
        with _sigint_sets(stop):
            text = "".join(self._echo(pieces))
        self.out.write("\n")
        if stats.finish_reason == "cancelled":
            self._note("[stopped]")
        elif self.interactive:
            self._note(_stats_line(stats))
        self.out.flush()
        return text

    def _echo(self, pieces: Iterable[str]) -> Iterator[str]:
        for piece in pieces:
            self.out.write(piece)
            self.out.flush()
            yield piece

    def _note(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    # ------------------------------------------------------------ commands

    def handle(self, line: str) -> bool:
        """Act on one input line. Returns False when the user asked to leave.

        Raises:
            SlackdistError: a reply could not be made (e.g. PromptTooLongError).
        """
        text = line.strip()
        if not text:
            return True
        if text.lower() in EXIT_WORDS:
            return False
        if not text.startswith("/"):
            self.ask(text)
            return True
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        if command == "/reset":
            self.reset()
            self._note("[history cleared]")
        elif command == "/system":
            if rest:
                self.reset(system=rest)
                self._note("[system prompt set; history cleared]")
            else:
                self._note(self.system)
        elif command == "/compare":
            self.compare(rest or None)
        elif command == "/help":
            self._note(HELP)
        else:
            self._note(f"unknown command {command}; /help lists the commands")
        return True


class _sigint_sets:  # noqa: N801 - used like a function: `with _sigint_sets(event):`
    """While active, Ctrl+C sets `event` instead of raising KeyboardInterrupt (main thread only)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: object = None
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGINT, lambda signum, frame: self.event.set())

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)


def _stats_line(stats: ReplyStats) -> str:
    decode_s = stats.total_s - (stats.first_token_s or 0.0)
    rate = (stats.completion_tokens - 1) / decode_s if stats.completion_tokens > 1 and decode_s > 0 else 0.0
    return (
        f"[prompt {stats.prompt_tokens} tokens, reply {stats.completion_tokens} tokens, {rate:.1f} tokens/s]"
    )


# ---------------------------------------------------------------- the program


def run_repl(session: ChatSession) -> int:
    """The interactive loop on a terminal: `you> ` prompts until exit, Ctrl+D or Ctrl+C."""
    try:  # not on every platform; importing it gives input() line editing and history
        import readline  # noqa: F401
    except ImportError:
        pass
    session._note(f"Chatting as '{session.label}'. /help lists the commands; exit or Ctrl+D leaves.")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            session.out.write("\n")
            return 0
        try:
            if not session.handle(line):
                return 0
        except SlackdistError as e:
            print(f"error: {e}", file=sys.stderr)


def run_lines(session: ChatSession, lines: Iterable[str]) -> int:
    """Non-interactive: each line is a message (commands work too); replies go to stdout."""
    for line in lines:
        if not session.handle(line):
            break
    return 0


def load_model(cfg: Config) -> InferenceModel:
    """Load the model named by `--model-dir` (adapter, checkpoint or merged folder).

    Raises:
        SlackdistError: the folder is missing or holds no model.
    """
    model_dir = Path(cfg.chat.model_dir)
    if not model_dir.is_dir():
        raise SlackdistError(
            f"{model_dir}: no such model folder (train one with `python main.py --train`, or pass --model-dir DIR)"
        )
    print(f"loading {model_dir} ...", file=sys.stderr, flush=True)
    return load_for_inference(
        str(model_dir), base=cfg.chat.base, load_in_4bit=cfg.chat.load_in_4bit, merge=cfg.chat.merge_adapter
    )


def fast_replies(im: InferenceModel) -> InferenceModel:
    """The adapter folded into its 16-bit base in memory where `load_model` made that possible (said once)."""
    if im.mergeable:
        print(
            "merging the adapter into the 16-bit base in memory (fast replies) ...",
            file=sys.stderr,
            flush=True,
        )
    return merge_in_memory(im)


def main(args: argparse.Namespace, cfg: Config) -> int:
    """`slackdist chat [--model-dir DIR] [--prompt TEXT]`.

    Raises:
        SlackdistError: bad model folder; with --prompt, a prompt that does not fit.
    """
    im = fast_replies(load_model(cfg))
    settings = GenerationSettings.from_config(cfg.chat)
    persona = cfg.chat.persona or im.info.persona
    system = cfg.chat.system or im.info.system_prompt_for(persona)
    interactive = args.prompt is None and sys.stdin.isatty()
    session = ChatSession(im, settings, system, label=persona or "bot", interactive=interactive)
    warm_up(im, settings)
    if args.prompt is not None:
        session.ask(args.prompt)
        return 0
    if interactive:
        return run_repl(session)
    return run_lines(session, sys.stdin)
