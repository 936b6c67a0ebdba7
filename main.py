"""The original entry points: `python main.py --train` and `python main.py --test [--model-dir DIR]`.

`--train` prepares the Slack export in `data/` (or --export) and fine-tunes the
default model into `llama3_slack_finetuned/`; `--test` opens the chat.
Both are thin wrappers over `slackdist prepare`, `slackdist train` and `slackdist chat`;
other options (--model DIR, --lr, --set KEY=VALUE, ...) go to `slackdist train` or `slackdist chat`.
"""

from __future__ import annotations

import argparse
import sys

from slackdist import __version__
from slackdist.caches import keep_compile_caches
from slackdist.cli import OneLineErrorParser, build_parser
from slackdist.cli import main as slackdist_main
from slackdist.config import Config, ConfigError, config_from_args
from slackdist.errors import SlackdistError
from slackdist.logs import setup_logging
from slackdist.offline import set_private_defaults

OUTPUT = "llama3_slack_finetuned"


def train_config(argv: list[str]) -> Config:
    """The config `slackdist train ARGV` will run with, the model checked: a bad option, a missing or
    gated model or no network is one line before the export is prepared.

    Raises:
        ConfigError: invalid config.
        SlackdistError: the model cannot load (`slackdist.model.load.check_model_source`).
    """
    cfg = config_from_args(build_parser().parse_args(argv))
    # Before the hub client is imported (it reads these once); --data is the folder prepare writes.
    set_private_defaults([cfg.model.base_model])
    keep_compile_caches()
    from slackdist.model.load import check_model_source  # torch and transformers: only for --train

    check_model_source(cfg.model.base_model)
    return cfg


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = OneLineErrorParser(  # no abbreviations: --model is `slackdist train`'s, not --model-dir
        prog="main.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"slackdist {__version__}")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="prepare data/ and fine-tune")
    mode.add_argument("--test", action="store_true", help="chat with the fine-tuned model")
    parser.add_argument("--model-dir", default=OUTPUT, help="model folder for --test")
    parser.add_argument("--export", default="data", help="Slack export folder or .zip for --train")
    parser.add_argument(
        "--prepared", default="data/prepared", help="where --train writes the prepared dataset"
    )
    parser.add_argument("--config", default=None, help="slackdist YAML config")
    args, extra = parser.parse_known_args(argv)
    config = ["--config", args.config] if args.config else []
    if args.test:
        return slackdist_main(["chat", "--model-dir", args.model_dir, *config, *extra])
    train_argv = ["train", "--data", args.prepared, "--output", OUTPUT, *config, *extra]
    try:
        cfg = train_config(train_argv)
    except (ConfigError, SlackdistError) as e:
        print(f"main.py --train: error: {e}", file=sys.stderr)
        return 2
    # Prepare measures conversations with the tokenizer training uses, against the length training
    # keeps, so no conversation prepare wrote is dropped by training for being too long.
    tokenizer = cfg.data.tokenizer or cfg.model.base_model
    budget = ["--tokenizer", tokenizer, "--max-tokens", str(cfg.data.max_tokens)]
    code = slackdist_main(["prepare", args.export, "--out", args.prepared, *config, *budget])
    if code:
        return code
    return slackdist_main(train_argv)


if __name__ == "__main__":
    sys.exit(main())
