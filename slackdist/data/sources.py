"""`--data`: chat records from wherever they are, opened with Hugging Face `datasets` as named splits.

A source is any of:

- a folder `slackdist prepare` wrote: train.jsonl, validation.jsonl, test.jsonl (an empty file is an
  empty split);
- one `.jsonl`, `.json` or `.parquet` file: the split "train";
- a folder written by `Dataset.save_to_disk` (the split "train") or `DatasetDict.save_to_disk`;
- another folder of data files `datasets` can read (e.g. a downloaded hub dataset repository);
- a hub dataset id such as "HuggingFaceH4/no_robots" (checked first by `slackdist.hub.ensure_hub_repo`,
  so offline it is one line, not a minute of retries).

Each record needs a `messages` column: `[{"role": "system"|"user"|"assistant", "content": str}, ...]`;
other columns (prepare's `meta`) are kept for eval's sample replies. JSON and Parquet files are
converted to Arrow once, into the `datasets` cache (HF_DATASETS_CACHE), and read from there,
memory-mapped, while the file is unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from slackdist.errors import SlackdistError, first_line
from slackdist.hub import ensure_hub_repo, looks_like_a_path

PREPARED_SPLITS = ("train", "validation", "test")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MESSAGES = "messages"
RECORD_FORMAT = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}, ...]}'
LOCAL_DATA_HINT = "pass --data PATH: a prepared folder, a .jsonl/.json/.parquet file or a save_to_disk folder"


class BadRecord(ValueError):
    """A record that cannot be encoded: its row in the split and what is wrong (raised while tokenizing)."""

    def __init__(self, row: int, problem: str) -> None:
        super().__init__(row, problem)  # the args rebuild it when a tokenizing worker pickles it
        self.row = row
        self.problem = problem


@dataclass
class DataSource:
    """An opened `--data`: its splits, and the file behind each split where there is one."""

    spec: str
    """What --data said."""
    kind: str
    """"prepared folder", "file", "save_to_disk folder", "folder" or "hub dataset"."""
    splits: dict[str, Dataset | None]
    """Split name -> records; None for an empty file."""
    files: dict[str, Path] = field(default_factory=dict)
    """Split name -> the file it was read from (prepared folders and single files)."""

    def where(self, split: str) -> str:
        """The split's file, or 'SPEC (SPLIT split)', for messages."""
        return str(self.files[split]) if split in self.files else f"{self.spec} ({split} split)"

    def no_split(self, split: str) -> str:
        """The error line for a split the source does not have."""
        names = ", ".join(self.splits) or "none"
        return f"{self.spec}: no {split!r} split (its splits: {names})"

    def records(self, split: str) -> Dataset | None:
        """The split's records (None: an empty file), with a `messages` column.

        Raises:
            SlackdistError: no such split, or no `messages` column.
        """
        if split not in self.splits:
            raise SlackdistError(self.no_split(split))
        ds = self.splits[split]
        if ds is not None and MESSAGES not in ds.column_names:
            columns = ", ".join(ds.column_names)
            raise SlackdistError(
                f"{self.where(split)}: no {MESSAGES!r} column (columns: {columns}); expected chat records "
                f"{RECORD_FORMAT}"
            )
        return ds

    def locate(self, split: str, row: int, problem: str) -> str:
        """The error line for a bad record: FILE:LINE for JSON Lines, else SOURCE (SPLIT split), row N."""
        file = self.files.get(split)
        if file is not None and file.suffix == ".jsonl":
            return f"{file}:{_line_of_row(file, row)}: {problem}"
        return f"{self.where(split)}, row {row}: {problem}"


def open_data(spec: str) -> DataSource:
    """Open `--data` (module docstring) without tokenizing anything.

    Raises:
        SlackdistError: no such path, a file or folder `datasets` cannot read (with the first bad line of
            a JSONL file), a Slack export that was not prepared, or a hub id that cannot load.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise SlackdistError(f"{spec}: expected a .jsonl, .json or .parquet file, or a folder")
        return DataSource(spec, "file", {"train": _load_file(builder, path)}, {"train": path})
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _open_saved(spec, path)
        if any((path / f"{split}.jsonl").is_file() for split in PREPARED_SPLITS):
            files = {s: path / f"{s}.jsonl" for s in PREPARED_SPLITS if (path / f"{s}.jsonl").is_file()}
            splits = {s: _load_file("json", f) if _has_content(f) else None for s, f in files.items()}
            return DataSource(spec, "prepared folder", splits, files)
        if (path / "channels.json").is_file() or (path / "users.json").is_file():
            raise SlackdistError(
                f"{spec}: a Slack export, not chat records; run `slackdist prepare {spec} --out DIR` and pass "
                "--data DIR"
            )
        return _open_folder(spec, path)
    if looks_like_a_path(spec) or path.suffix.lower() in FILE_BUILDERS:
        raise SlackdistError(f"{spec}: no such file or folder")
    ensure_hub_repo(spec, "dataset", local_hint=LOCAL_DATA_HINT, subject=_not_here(spec))
    try:
        loaded = load_dataset(spec)
    except Exception as e:  # datasets raises many kinds (missing config, network, format): one line
        raise SlackdistError(f"{spec}: cannot load the hub dataset ({first_line(e)})") from None
    return DataSource(spec, "hub dataset", dict(loaded))


def check_data_source(spec: str) -> None:
    """Fail fast on a `--data` that cannot be opened, before a model is loaded: a missing path, a Slack
    export, an unusable hub id (nothing is read yet).

    Raises:
        SlackdistError: as `open_data` would, for those cases.
    """
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir() and ((path / "channels.json").is_file() or (path / "users.json").is_file()):
            open_data(spec)  # raises the Slack export line
        return
    if looks_like_a_path(spec) or path.suffix.lower() in FILE_BUILDERS:
        raise SlackdistError(f"{spec}: no such file or folder")
    ensure_hub_repo(spec, "dataset", local_hint=LOCAL_DATA_HINT, subject=_not_here(spec))


def _not_here(spec: str) -> str:
    """How a hub-id error line starts for `--data`: a path is meant more often than a hub dataset."""
    return f"{spec}: no such file or folder here, and as a hub id"


def _has_content(path: Path) -> bool:
    """A file with at least one non-blank character (prepare writes empty files for empty splits)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return True
    return False


def _load_file(builder: str, path: Path) -> Dataset:
    """One file as a Dataset (converted to Arrow in the datasets cache once).

    Raises:
        SlackdistError: unreadable; for JSON Lines, the first bad line by number.
    """
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps pyarrow's parse errors in DatasetGenerationError
        bad = _first_bad_line(path) if path.suffix.lower() == ".jsonl" else None
        raise SlackdistError(bad or f"{path}: cannot read ({first_line(e.__cause__ or e)})") from None


def _first_bad_line(path: Path) -> str | None:
    """'FILE:LINE: problem' for the first line that is not a JSON object with a messages list, else None."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{path}:{lineno}: not valid JSON ({e.msg})"
            if not isinstance(record, dict) or not isinstance(record.get(MESSAGES), list):
                return f'{path}:{lineno}: expected an object with a "messages" list'
    return None


def _line_of_row(path: Path, row: int) -> int:
    """The line number of record `row` of a JSON Lines file (blank lines hold no record)."""
    seen = -1
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            seen += bool(line.strip())
            if seen == row:
                return lineno
    return row + 1


def _open_saved(spec: str, path: Path) -> DataSource:
    try:
        loaded = load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError, a version mismatch, a damaged state.json
        raise SlackdistError(f"{spec}: cannot load the save_to_disk folder ({first_line(e)})") from None
    splits = dict(loaded) if isinstance(loaded, DatasetDict) else {"train": loaded}
    return DataSource(spec, "save_to_disk folder", splits)


def _open_folder(spec: str, path: Path) -> DataSource:
    try:
        loaded = load_dataset(str(path))
    except Exception as e:  # no data files, mixed formats, unreadable files
        raise SlackdistError(
            f"{spec}: no train.jsonl (a `slackdist prepare` folder), no save_to_disk dataset, and no data files "
            f"`datasets` can read ({first_line(e)})"
        ) from None
    return DataSource(spec, "folder", dict(loaded))
