"""The original entry points: `python main.py --train` and `python main.py --test [--model-dir DIR]`.

`--train` prepares the Slack export in `data/` (or --export) and fine-tunes the
default model into `llama3_slack_finetuned/`; `--test` opens the chat.
Both are thin wrappers over `slackdist prepare`, `slackdist train` and `slackdist chat`.
"""

from __future__ import annotations

import argparse
import sys

from slackdist.cli import main as slackdist_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="prepare data/ and fine-tune")
    mode.add_argument("--test", action="store_true", help="chat with the fine-tuned model")
    parser.add_argument("--model-dir", default="llama3_slack_finetuned", help="model folder for --test")
    parser.add_argument("--export", default="data", help="Slack export folder or .zip for --train")
    parser.add_argument(
        "--prepared", default="data/prepared", help="where --train writes the prepared dataset"
    )
    parser.add_argument("--config", default=None, help="slackdist YAML config")
    args, extra = parser.parse_known_args(argv)
    config = ["--config", args.config] if args.config else []
    if args.test:
        return slackdist_main(["chat", "--model-dir", args.model_dir, *config, *extra])
    code = slackdist_main(["prepare", args.export, "--out", args.prepared, *config])
    if code:
        return code
    return slackdist_main(
        ["train", "--data", args.prepared, "--output", "llama3_slack_finetuned", *config, *extra]
    )


if __name__ == "__main__":
    sys.exit(main())
