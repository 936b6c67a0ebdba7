"""Day files: one ``YYYY-MM-DD.json`` per conversation folder and day, each a JSON list of messages.

Names are in the exporter's local time zone (time comes from each message's ``ts``), and they sort
in date order. A day file that cannot be read or parsed is a counted warning and reads as empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import orjson

from slackdist.slack.export import ExportSource, FileTooLarge
from slackdist.slack.metadata import Channel
from slackdist.slack.warnings import TOO_DEEP, Warnings, describe, error_reason


def day_files(src: ExportSource, channel: Channel) -> list[str]:
    """The channel's day files (relative paths) in date order."""
    return [f"{channel.folder}/{name}" for name in src.day_files.get(channel.folder, [])]


def count_day_files(src: ExportSource, channels: Iterable[Channel]) -> int:
    """How many day files the channels hold (for a progress bar's total)."""
    return sum(len(src.day_files.get(c.folder, [])) for c in channels)


def count_messages(src: ExportSource, channels: Iterable[Channel]) -> int:
    """How many items the channels' day files hold (unreadable files count 0); reads every day file."""
    ignored = Warnings()
    return sum(len(load_day_file(src, rel, ignored)) for c in channels for rel in day_files(src, c))


def parse_json(raw: bytes | bytearray) -> Any:
    """`json.loads`, through orjson first: day files are most of what `prepare` reads and orjson parses
    them in 55% of the time (30,000 messages of `bench/prepare_bench.py`: 0.076 s vs 0.137 s). What orjson
    refuses and the standard library takes (NaN, 1e400, a BOM, UTF-16, lone surrogates, nesting deeper
    than 1024) is parsed again by `json.loads`, so results and errors are the standard library's; the
    one difference is an integer beyond 64 bits, which orjson reads as a float (Slack writes none)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def load_day_file(src: ExportSource, rel: str, warnings: Warnings) -> list[Any]:
    """One day file's items; a file that cannot be read or parsed is a counted warning and [].

    Warning kinds: ``bad_day_file`` (not UTF-8, invalid or truncated JSON, nested too deep, not a list,
    unreadable) and ``file_too_large`` (over ``ExportLimits.max_file_bytes``).
    """
    where = src.where(rel)
    try:
        data = parse_json(src.read_bytes(rel))
    except FileTooLarge as e:
        warnings.add("file_too_large", where, f"{e}; file skipped")
        return []
    except UnicodeDecodeError as e:
        warnings.add("bad_day_file", where, f"not UTF-8 ({error_reason(e)}); file skipped")
        return []
    except ValueError as e:
        warnings.add("bad_day_file", where, f"invalid or truncated JSON ({error_reason(e)}); file skipped")
        return []
    except RecursionError:
        warnings.add("bad_day_file", where, f"{TOO_DEEP}; file skipped")
        return []
    except OSError as e:
        warnings.add("bad_day_file", where, f"cannot read ({error_reason(e)}); file skipped")
        return []
    if not isinstance(data, list):
        warnings.add("bad_day_file", where, f"expected a JSON list of messages, got {describe(data)}")
        return []
    return data
