"""README.md of a prepared folder: a dataset card, so the folder is a `datasets` dataset as it is.

Its YAML header lists the split files (`configs:`), so `datasets.load_dataset(DIR)` reads exactly
train/validation/test.jsonl as their splits (not provenance.jsonl or report.json beside them) and skips an empty split,
which `datasets` cannot read (its own guess from the file names fails on a tiny export's empty
validation.jsonl). The same card makes the folder uploadable as a (private) hub dataset repository,
which `slackdist train --data OWNER/NAME` then reads. The JSONL files stay the one copy of the data:
readable, editable, and converted to Arrow by `datasets` in its cache, again whenever they change.
"""

from __future__ import annotations

from collections.abc import Mapping

CARD_FILE = "README.md"


def dataset_card(splits: Mapping[str, int]) -> str:
    """The card's text for split name -> number of records (splits with none are left out of `configs`)."""
    files = "".join(f"  - split: {name}\n    path: {name}.jsonl\n" for name, n in splits.items() if n > 0)
    counts = ", ".join(f"{name} {n:,}" for name, n in splits.items())
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        f"{files}"
        "---\n\n"
        "# Chat records prepared by slackdist\n\n"
        "Conversations of a private Slack workspace, cleaned and redacted by `slackdist prepare` "
        "(report.md says how). Keep every copy private, a hub repository too.\n\n"
        f"Records per split: {counts}. Each line of a split file is one conversation: "
        '`{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], "meta": {...}}`.\n\n'
        "Load it with `datasets.load_dataset(PATH_OF_THIS_FOLDER)` (an empty split is not listed above: "
        "`datasets` cannot read an empty file), or train on it with `slackdist train --data PATH_OF_THIS_FOLDER`.\n"
    )
