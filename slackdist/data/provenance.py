"""Provenance: which messages and which people each record of a prepared dataset holds, from which export.

`prepare` writes ``DIR/provenance.jsonl`` beside the records. Its first line names the export::

    {"provenance": 1, "export": {"id": "sha256:…", "name": "acme", "path": "/data/acme.zip"}}

and each further line one record (every record of train, validation and test, once)::

    {"record": "3f2a…-0", "messages": [["C024BE91L", "1512085950.000216", "U1"], …], "users": ["U1", "U2"],
     "mentions": ["U3"]}

``messages`` are the Slack messages whose text the record holds: channel id, ts (unique only within a
channel) and who wrote it (null for a bot without a user); ``users`` the people who wrote them;
``mentions`` the people their text mentions by ``<@U…>`` (left-out people are in none of them:
`prepare --exclude-users`). The export's ``id``
is a hash of its metadata files (users, channels, groups, DMs) and of the list of its files
(:func:`export_identity`): `slackdist forget` uses it to check that it rewrites the dataset from the
export it came from.

The file travels with what is trained on the data: `slackdist train` copies it into its output
folder when the run starts (so checkpoints of an unfinished run are covered too), and `slackdist
merge` into the merged folder. `slackdist forget USER --models ROOT` finds every such folder under
ROOT whose provenance holds USER (:func:`find_holders`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from slackdist.errors import SlackdistError, first_line
from slackdist.files import json_line

PROVENANCE_FILE = "provenance.jsonl"
VERSION = 1
_METADATA_FILES = ("users.json", "org_users.json", "channels.json", "groups.json", "dms.json", "mpims.json")


class _Export(Protocol):
    def has(self, rel: str) -> bool: ...

    def read_bytes(self, rel: str) -> bytes | bytearray: ...

    def readable(self) -> list[str]: ...


def export_identity(src: _Export) -> str:
    """``sha256:`` + the hash of the export's metadata files' bytes and of its list of readable files.

    The same export (folder or zip of it) gives the same identity; another export, or this one with
    users, channels or day files added or removed, gives another. Day files' contents are not hashed
    (that would read the export twice).
    """
    digest = hashlib.sha256()
    for rel in _METADATA_FILES:
        if src.has(rel):
            try:
                data = bytes(src.read_bytes(rel))
            except Exception as e:  # noqa: BLE001 - too large or unreadable: hash what is known of it
                data = f"unreadable: {type(e).__name__}".encode()
            digest.update(f"{rel}\0{len(data)}\0".encode() + data)
    for rel in src.readable():
        digest.update(rel.encode() + b"\n")
    return "sha256:" + digest.hexdigest()


def header_line(identity: str, name: str, path: str | os.PathLike[str]) -> str:
    """The first line of provenance.jsonl."""
    export = {"id": identity, "name": name, "path": str(Path(path).resolve())}
    return json.dumps({"provenance": VERSION, "export": export}, ensure_ascii=False) + "\n"


def entry_line(
    record_id: str, messages: Iterable[tuple[str, str, str | None]], mentions: Iterable[str]
) -> bytes:
    """One record's line of provenance.jsonl: its messages as (channel id, ts, writer) and who they mention."""
    messages = list(messages)
    entry = {
        "record": record_id,
        "messages": messages,  # tuples are written as JSON arrays
        "users": list(dict.fromkeys(m[2] for m in messages if m[2])),
        "mentions": list(dict.fromkeys(mentions)),
    }
    return json_line(entry)


@dataclass(frozen=True)
class ExportRef:
    """The export a dataset was prepared from, as its provenance names it."""

    id: str
    name: str
    path: str


def read_export(path: str | os.PathLike[str]) -> ExportRef:
    """The export named by the header of a provenance.jsonl.

    Raises:
        SlackdistError: the file is missing or its first line is not a provenance header.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            head = json.loads(f.readline())
        export = head["export"]
        return ExportRef(id=str(export["id"]), name=str(export["name"]), path=str(export["path"]))
    except FileNotFoundError:
        raise SlackdistError(f"{path}: no provenance (prepare the data again with this version)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SlackdistError(f"{path}: not a provenance file ({first_line(e)})") from None


def iter_entries(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The record lines of a provenance.jsonl (after the header).

    Raises:
        SlackdistError: a line is not a record entry.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        f.readline()
        for n, line in enumerate(f, 2):
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or not isinstance(entry.get("record"), str):
                    raise ValueError("not a record entry")
            except ValueError as e:
                raise SlackdistError(f"{path}:{n}: bad provenance line ({first_line(e)})") from None
            yield entry


@dataclass(frozen=True)
class Holding:
    """How much of one person a provenance holds: records with their messages, records mentioning them."""

    folder: Path
    records: int
    mentions: int


def holding(path: str | os.PathLike[str], user_ids: Sequence[str]) -> Holding:
    """Records of a provenance.jsonl that hold messages of, or mention, any of ``user_ids``.

    Raises:
        SlackdistError: the file is not a provenance file.
    """
    ids = set(user_ids)
    records = mentions = 0
    for entry in iter_entries(path):
        records += not ids.isdisjoint(entry.get("users", ()))
        mentions += not ids.isdisjoint(entry.get("mentions", ()))
    return Holding(Path(path).parent, records, mentions)


def find_holders(root: str | os.PathLike[str], user_ids: Sequence[str]) -> list[Holding]:
    """Every folder under ``root`` (itself included) whose provenance.jsonl holds or mentions ``user_ids``.

    Raises:
        SlackdistError: ``root`` is not a folder, or a provenance file under it is unreadable.
    """
    root = Path(root)
    if not root.is_dir():
        raise SlackdistError(f"{root}: --models must be a folder")
    found = []
    for path in sorted(root.rglob(PROVENANCE_FILE)):
        held = holding(path, user_ids)
        if held.records or held.mentions:
            found.append(held)
    return found


def find_provenance(folder: str | os.PathLike[str]) -> Path | None:
    """The provenance of a model folder: its own, else its training output's (a ``best/`` or
    ``checkpoints/step-N/`` folder's is two levels up at most); None when there is none."""
    folder = Path(folder)
    for candidate in (folder, folder.parent, folder.parent.parent):
        path = candidate / PROVENANCE_FILE
        if path.is_file():
            return path
    return None


def copy_provenance(found: Path | None, folder: str | os.PathLike[str]) -> Path | None:
    """Copy a provenance.jsonl (``found``; None: nothing to copy) into ``folder``, under a temporary
    name first.

    Returns:
        The copy, or None when there was none (data prepared before provenance existed).
    """
    if found is None or not found.is_file():
        return None
    target = Path(folder) / PROVENANCE_FILE
    tmp = target.with_name(f".{PROVENANCE_FILE}.tmp")
    shutil.copyfile(found, tmp)
    os.replace(tmp, target)
    return target
