"""The reading stage (slackdist.slack: export, metadata, days, messages, content): folders and zips, metadata,
streaming day files, speakers, bots, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
from export_helpers import MARKER, deflate_bomb, msg, raw_zip, stored, write_export
from hypothesis import given
from hypothesis import strategies as st

from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
from slackdist.errors import SlackdistError
from slackdist.slack.days import count_day_files, parse_json
from slackdist.slack.export import ExportLimits, open_export
from slackdist.slack.messages import (
    BOT_SUBTYPES,
    HUMAN_SUBTYPES,
    SYSTEM_SUBTYPES,
    Message,
    drop_reason,
    iter_messages,
)
from slackdist.slack.metadata import Channel, list_channels, load_users
from slackdist.slack.warnings import Warnings


def read_all(
    path, *, include_dms: bool = True, include_private: bool = True, **kwargs
) -> tuple[list[Message], Warnings]:
    warnings = Warnings()
    with open_export(path) as src:
        users = load_users(src, warnings)
        channels = list_channels(
            src, include_dms=include_dms, include_private=include_private, warnings=warnings, **kwargs
        )
        messages = [m for c in channels for m in iter_messages(src, c, users, warnings)]
    return messages, warnings


def is_reply(message: Message) -> bool:
    return message.thread_ts is not None and message.thread_ts != message.ts


USERS = [{"id": "U1", "name": "ada", "real_name": "Ada Lovelace", "profile": {"display_name": ""}}]
CHANNELS = [{"id": "C1", "name": "general"}]


# ---- the shipped sample export ---------------------------------------------------------------------


def by_text(messages: list[Message], fragment: str) -> Message:
    found = [m for m in messages if fragment in m.text]
    assert len(found) == 1, fragment
    return found[0]


def test_sample_export_counts(sample_export_dir: Path) -> None:
    messages, warnings = read_all(sample_export_dir)
    reasons = Counter(drop_reason(m) or "human" for m in messages)
    assert len(messages) == 77
    assert reasons["human"] == 53
    assert reasons["bot"] == 8
    assert sum(n for r, n in reasons.items() if r.startswith("system:")) == 13
    assert reasons["subtype:file_comment"] == 1 and reasons["empty"] == 2
    assert warnings.counts == {"unknown_user": 1}  # U0GHOST02: not in users.json, no user_profile
    assert warnings.notes["non_day_files_skipped"] == 1  # random/canvas_in_the_conversation.json
    assert len({(m.channel.id, m.ts) for m in messages}) == len(messages)


def test_sample_export_channels_and_privacy(sample_export_dir: Path) -> None:
    with open_export(sample_export_dir) as src:
        every = {c.folder: c for c in list_channels(src, include_dms=True, include_private=True)}
        assert {c.kind for c in every.values()} == {"public", "private", "dm", "mpim"}
        assert every["D0DMADAGR1"] == Channel("D0DMADAGR1", "D0DMADAGR1", "dm", "D0DMADAGR1")
        assert every["mpdm-ada--grace--alan-1"].kind == "mpim"
        assert every["secret-project"] == Channel("G0PRIVATE1", "secret-project", "private", "secret-project")
        fc = every["FC:F0CANVAS1:Team notes #1"]  # no metadata entry: public, named after its folder
        assert (fc.kind, fc.name) == ("public", fc.folder)
        assert "no-messages" not in {c.name for c in every.values()}  # in channels.json, no folder
        default = {c.name for c in list_channels(src)}  # private channels and DMs only when opted in
        assert default == {"general", "engineering", "random", "international", fc.name}
        assert "secret-project" in {c.name for c in list_channels(src, include_private=True)}
        only = list_channels(src, channels=["#general", "C0ENGINEE1"])
        assert [c.name for c in only] == ["general", "engineering"]
        assert "random" not in {c.name for c in list_channels(src, exclude_channels=["random"])}
        with pytest.raises(SlackdistError, match="no channel named nope"):
            list_channels(src, channels=["nope"])
        assert count_day_files(src, list_channels(src, include_dms=True, include_private=True)) == 10


def test_sample_export_threads_and_order(sample_export_dir: Path) -> None:
    messages, _ = read_all(sample_export_dir, channels=["general", "engineering"])
    for channel in ("general", "engineering"):
        times = [float(m.ts) for m in messages if m.channel.name == channel]
        assert times == sorted(times)
    parent = by_text(messages, "Should we ship on Friday?")
    assert parent.thread_ts == parent.ts and not is_reply(parent) and parent.reply_count == 4
    replies = [m for m in messages if m.thread_ts == parent.ts and is_reply(m)]
    assert len(replies) == 4
    assert {Path(m.source_file).name for m in replies} == {
        "2021-03-01.json",
        "2021-03-03.json",
    }  # late replies
    broadcast = by_text(messages, "sharing with the channel")
    assert (
        broadcast.subtype == "thread_broadcast"
        and broadcast.thread_ts == parent.ts
        and drop_reason(broadcast) is None
    )
    old = by_text(messages, "Old-style thread")  # `replies: [{user, ts}]` format
    assert old.thread_ts == old.ts and old.reply_count == 2
    assert len([m for m in messages if m.thread_ts == old.ts and is_reply(m)]) == 2
    orphans = [m for m in messages if m.thread_ts == "1614500000.000100"]  # parent missing from the export
    assert len(orphans) == 2 and all(is_reply(m) for m in orphans)
    late = by_text(messages, "Late note")  # 17:30 in Los Angeles: UTC date is a day after the file's name
    assert (
        Path(late.source_file).name == "2021-03-01.json" and float(late.ts) > 1614643200
    )  # 2021-03-02 00:00 UTC


def test_sample_export_speakers(sample_export_dir: Path) -> None:
    messages, _ = read_all(sample_export_dir)
    assert by_text(messages, "Morning").user_name == "Ada Lovelace"  # display_name
    assert by_text(messages, "Anyone up for coffee").user_name == "Grace Hopper"  # empty display -> real_name
    assert by_text(messages, "Sure!").user_name == "alan.t"  # display_name wins over real_name
    assert by_text(messages, "what do you think about").user_name == "linus"  # only the user name
    assert by_text(messages, "Looks good to me").user_name == "casper"  # not in users.json: user_profile
    ghost = by_text(messages, "Who am I?")
    assert (ghost.user_id, ghost.user_name) == ("U0GHOST02", "unknown-user")
    assert by_text(messages, "確認しました").user_name == "佐藤 由紀"
    comment = by_text(messages, "line 42 is the culprit")  # file_comment: speaker in comment.user
    assert comment.user_id == "U0ALAN001" and drop_reason(comment) == "subtype:file_comment"


def test_sample_export_bots_in_every_form(sample_export_dir: Path) -> None:
    messages, _ = read_all(sample_export_dir, channels=["random"])
    bots = [m for m in messages if drop_reason(m) == "bot"]
    assert {m.user_name for m in bots} == {"ci", "Deploy Bot", "Standup App", "Slackbot", "Digest"}
    assert len(bots) == 8
    assert all(m.is_bot for m in bots)
    ci = by_text(
        messages, "All 128 tests passed"
    )  # bot_message with only bot_id/username, text in attachments
    assert (
        ci.user_id is None
        and ci.text == "Build <https://ci.example.org/42|#42>\nAll 128 tests passed\nBranch: main"
    )
    assert by_text(messages, "Build #43 failed").subtype == "bot_message"  # attachment fallback only
    added = by_text(messages, "added an integration")  # bot_add carries the added bot's id, a person speaks
    assert not added.is_bot and drop_reason(added) == "system:bot_add"
    human = by_text(messages, "Release notes for")  # content only in rich_text blocks
    assert human.text == (
        "Release notes for <@U0ADA0001>: see <https://example.org/release|release page> &amp; enjoy :sparkles:\n"
        "```make release VERSION=1.4 &amp;&amp; echo &lt;done&gt;```\n"
    )
    assert drop_reason(human) is None


def test_sample_export_files_reactions_edits(sample_export_dir: Path) -> None:
    messages, _ = read_all(sample_export_dir)
    assert by_text(messages, "Architecture diagram").files == ["architecture.png"]  # hidden_by_limit skipped
    # legacy `file`: its upload notice links the file already, so no second `[file: build.log]`
    legacy = by_text(messages, "uploaded a file")
    assert legacy.files == [] and "/F0OLD0001/build.log|build.log>" in legacy.text
    tomb = [m for m in messages if m.subtype == "file_share" and not m.text]
    assert len(tomb) == 1 and tomb[0].files == [] and drop_reason(tomb[0]) == "empty"
    morning = by_text(messages, "Morning")
    assert morning.reactions == [("+1", 3), ("tada", 1)] and not morning.edited
    assert by_text(messages, "I'll check").edited
    deleted = by_text(messages, "This message was deleted.")
    assert drop_reason(deleted) == "system:tombstone"


def test_zip_and_nested_zip_read_like_the_folder(
    sample_export_dir: Path, sample_export_zip: Path, sample_export_zip_nested: Path
) -> None:
    def summary(path):
        messages, warnings = read_all(path)
        return [(m.channel, m.ts, m.user_name, m.text, m.files) for m in messages], dict(warnings.counts)

    expected = summary(sample_export_dir)
    assert summary(sample_export_zip) == expected
    assert summary(sample_export_zip_nested) == expected
    with open_export(sample_export_zip_nested) as src:
        assert src.name == "sample_export_nested"
        assert "sample_export_nested.zip:Sample Workspace Slack export/general/" in src.where("general/x")


def test_reading_streams_one_day_file_at_a_time(sample_export_dir: Path) -> None:
    warnings = Warnings()
    with open_export(sample_export_dir) as src:
        users = load_users(src, warnings)
        general = list_channels(src, channels=["general"])[0]
        reads: list[str] = []
        original = src.read_bytes
        src.read_bytes = lambda rel: reads.append(rel) or original(rel)  # type: ignore[method-assign]
        stream = iter_messages(src, general, users, warnings)
        first = next(stream)
        assert reads == ["general/2021-03-01.json"] and Path(first.source_file).name == "2021-03-01.json"
        rest = list(stream)
        assert reads == ["general/2021-03-01.json", "general/2021-03-03.json"]
        assert len(rest) == 23


# ---- subtypes and the keep/drop decision -------------------------------------------------------------


CH = Channel("C1", "general", "public", "general")


def make(text: str = "hi", **kw) -> Message:
    return Message(channel=CH, ts="1.000001", thread_ts=None, user_id="U1", user_name="Ada", text=text, **kw)


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (make(), None),
        (make(subtype="thread_broadcast"), None),
        (make(subtype="me_message"), None),
        (make("", subtype="file_share", files=["a.png"]), None),
        (make(is_bot=True), "bot"),
        (make(subtype="bot_message"), "bot"),
        (make(subtype="channel_join"), "system:channel_join"),
        (make(subtype="tombstone", is_bot=True), "system:tombstone"),
        (make(subtype="huddle_thread"), "system:huddle_thread"),
        (make(subtype="file_comment"), "subtype:file_comment"),
        (make(" \n "), "empty"),
        (make(""), "empty"),
    ],
)
def test_drop_reason(message: Message, reason: str | None) -> None:
    assert drop_reason(message) == reason


def test_subtype_sets_are_disjoint() -> None:
    assert {None, "thread_broadcast", "me_message", "file_share"} <= HUMAN_SUBTYPES
    assert not (HUMAN_SUBTYPES & SYSTEM_SUBTYPES) and not (HUMAN_SUBTYPES & BOT_SUBTYPES)
    assert not (SYSTEM_SUBTYPES & BOT_SUBTYPES)


# ---- bad input ---------------------------------------------------------------------------------------


def test_missing_path_and_not_an_export(tmp_path: Path) -> None:
    with pytest.raises(SlackdistError, match="no such file"):
        with open_export(tmp_path / "nope"):
            pass
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("hi")
    with pytest.raises(SlackdistError, match=r"not a Slack export") as err:
        with open_export(tmp_path / "notes"):
            pass
    assert str(tmp_path / "notes") in str(err.value)
    (tmp_path / "file.txt").write_text("not a zip")
    with pytest.raises(SlackdistError, match="not a folder or a .zip"):
        with open_export(tmp_path / "file.txt"):
            pass
    bogus = tmp_path / "bogus.zip"
    with zipfile.ZipFile(bogus, "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(SlackdistError, match="bogus.zip: not a Slack export"):
        with open_export(bogus):
            pass


def test_folder_with_one_top_folder(tmp_path: Path, sample_export_dir: Path) -> None:
    shutil.copytree(sample_export_dir, tmp_path / "unzipped" / "Sample Workspace Slack export")
    messages, _ = read_all(tmp_path / "unzipped")
    assert len(messages) == 77


def test_empty_export(tmp_path: Path) -> None:
    root = write_export(tmp_path / "empty", {"users.json": USERS, "channels.json": CHANNELS})
    (root / "general").mkdir()
    with pytest.raises(SlackdistError, match=r"empty export \(metadata but no YYYY-MM-DD.json"):
        with open_export(root):
            pass
    write_export(root, {"general/2021-01-01.json": []})  # day files, but no message in them
    assert read_all(root)[0] == []
    with pytest.raises(SlackdistError, match=r"no conversation left \(0 human messages"):
        prepare(root, tmp_path / "out", DataConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written


@pytest.mark.parametrize(
    ("member", "label"),
    [("/etc/evil.json", "absolute"), ("../evil.json", "dotdot"), ("a/../../evil.json", "deep")],
)
def test_zip_with_unsafe_paths_is_refused(tmp_path: Path, member: str, label: str) -> None:
    bad = tmp_path / f"{label}.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("channels.json", json.dumps(CHANNELS))
        zf.writestr("general/2021-01-01.json", json.dumps([msg("1.1")]))
        zf.writestr(member, "[]")
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    with pytest.raises(SlackdistError) as err:
        with open_export(bad):
            pass
    assert str(bad) in str(err.value) and member in str(err.value)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before  # nothing written beside us
    assert not (tmp_path / "evil.json").exists()


def test_truncated_and_non_utf8_day_files_are_counted_warnings(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "x",
        {
            "users.json": USERS,
            "channels.json": CHANNELS,
            "general/2021-01-01.json": [msg("1609459200.000001", "first")],
            "general/2021-01-02.json": b'[{"type": "message", "user": "U1", "text": "cut off',
            "general/2021-01-03.json": json.dumps(
                [msg("1609632000.000001", "caf\u00e9")], ensure_ascii=False
            ).encode("latin-1"),
            "general/2021-01-04.json": {"not": "a list"},
            "general/2021-01-05.json": [
                msg("1609804800.000001", "last"),
                "junk",
                {"type": "message", "text": "no ts"},
            ],
        },
    )
    messages, warnings = read_all(root)
    assert [m.text for m in messages] == ["first", "last"]
    assert warnings.counts == {"bad_day_file": 3, "bad_message": 1, "bad_ts": 1}
    assert [w.detail for w in warnings.examples["bad_message"]] == [
        "item 1 is a string of 4 characters, not a message object; skipped"  # described, never quoted
    ]
    bad = {Path(w.where).name: w.detail for w in warnings.examples["bad_day_file"]}
    assert bad["2021-01-02.json"].startswith("invalid or truncated JSON")
    assert bad["2021-01-03.json"].startswith("not UTF-8")
    assert bad["2021-01-04.json"].startswith("expected a JSON list")
    assert str(root / "general" / "2021-01-02.json") in str(warnings.examples["bad_day_file"][0])
    with pytest.raises(
        SlackdistError, match=r"2021-01-02.json: invalid or truncated JSON .*4 more warnings.*--strict"
    ):
        warnings.raise_if_any()


def test_missing_users_json_falls_back_to_user_profile_then_unknown(tmp_path: Path) -> None:
    profile = {"real_name": "Grace Hopper", "display_name": ""}
    root = write_export(
        tmp_path / "x",
        {
            "channels.json": CHANNELS,
            "general/2021-01-01.json": [
                msg("1.000001", "a", user="U2", user_profile=profile),
                msg("1.000002", "b", user="U2"),  # learned from the first message
                msg("1.000003", "c", user="U3"),
                msg("1.000004", "d", user="U3"),  # warned once per user
            ],
        },
    )
    messages, warnings = read_all(root)
    assert [m.user_name for m in messages] == ["Grace Hopper", "Grace Hopper", "unknown-user", "unknown-user"]
    assert warnings.counts == {"missing_users": 1, "unknown_user": 1}
    assert "users.json" in warnings.examples["missing_users"][0].where


def test_enterprise_grid_org_users(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "grid",
        {
            "org_users.json": [{"id": "W1", "name": "ada", "profile": {"display_name": "Ada G"}}],
            "channels.json": CHANNELS,
            "general/2021-01-01.json": [msg("1.1", user="W1")],
        },
    )
    messages, warnings = read_all(root)
    assert messages[0].user_name == "Ada G" and not warnings


@pytest.mark.parametrize("odd", [b'[""]', b"[]", b"   \n", b"{}", b"null", b"[1, null, []]", b"{not json"])
def test_odd_metadata_values_do_not_crash(tmp_path: Path, odd: bytes) -> None:
    files: dict[str, object] = {
        name: odd for name in ("users.json", "channels.json", "groups.json", "dms.json")
    }
    files["mpims.json"] = odd
    files["general/2021-01-01.json"] = [msg("1.1")]
    files["D0ABCDEFGH/2021-01-01.json"] = [msg("1.2")]
    root = write_export(tmp_path / "odd", files)
    with open_export(root) as src:
        every = {c.folder: c.kind for c in list_channels(src, include_dms=True)}
        assert every == {"general": "public", "D0ABCDEFGH": "dm"}  # a D-id folder stays private data
        assert list_channels(src) == [Channel("general", "general", "public", "general")]
        users = load_users(src)
        assert users == {}


def test_channel_without_metadata_and_non_day_files(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "x",
        {
            "users.json": USERS,
            "general/2021-01-01.json": [msg("1.1")],
            "general/canvas_in_the_conversation.json": {"title": "x"},
            "general/notes.txt": b"hello",
            "README.md": b"# export",
            ".gitkeep": b"",
        },
    )
    messages, warnings = read_all(root)
    assert len(messages) == 1 and messages[0].channel.name == "general" and not warnings
    assert warnings.notes["non_day_files_skipped"] == 2


def test_message_shapes(tmp_path: Path) -> None:
    day = [
        msg(
            "1.000001",
            "",
            subtype="bot_message",
            user="",
            bot_id="B1",
            username="",
            attachments=[{"fallback": "fb"}],
        ),
        msg(
            "1.000002",
            "",
            blocks=[
                {
                    "type": "rich_text",
                    "elements": [
                        {
                            "type": "rich_text_list",
                            "style": "bullet",
                            "elements": [
                                {"type": "rich_text_section", "elements": [{"type": "text", "text": "a<b"}]}
                            ],
                        }
                    ],
                }
            ],
        ),
        msg("1.000003", "x", reactions=[{"name": "eyes", "users": ["U1", "U2"]}, {"name": ""}, "bad"]),
        msg(
            "1.000004",
            "y",
            thread_ts="1.000001",
            files=[{"name": "", "title": "T"}, {"mode": "tombstone"}, "x"],
        ),
        {"type": "message", "user": "U1", "text": "num ts", "ts": 1.5},
        {"type": "channel_marker", "ts": "1.7"},
        msg("1.000005", "reply", thread_ts="1.000009", root={"ts": "1.000009"}),
        msg("1.000006", "with user and bot id", bot_id="B2"),
        msg("1.000007", "slackbot", user="USLACKBOT"),
    ]
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": day}
    )
    messages, warnings = read_all(root)
    by_ts = {m.ts: m for m in messages}
    assert (
        by_ts["1.000001"].text == "fb" and by_ts["1.000001"].user_name == "bot" and by_ts["1.000001"].is_bot
    )
    assert by_ts["1.000002"].text == "- a&lt;b\n"
    assert by_ts["1.000003"].reactions == [("eyes", 2)]
    assert by_ts["1.000004"].files == ["T"] and is_reply(by_ts["1.000004"])
    assert by_ts["1.500000"].text == "num ts"
    assert "1.7" not in by_ts and warnings.notes["not_a_message:channel_marker"] == 1
    assert by_ts["1.000006"].is_bot and by_ts["1.000007"].is_bot
    assert by_ts["1.000001"].user_name == "bot"


# ---- the two real public exports ---------------------------------------------------------------------


def test_public_exports_read_with_sane_counts(public_exports: dict[str, Path]) -> None:
    expected = {
        "sev_testarchive_2016": {"messages": 158, "bot": 94, "system:channel_join": 8},
        "houstondatavis_2016": {"messages": 1382, "system:channel_join": 320, "bot": 0},
    }
    for name, want in expected.items():
        messages, warnings = read_all(public_exports[name])
        reasons = Counter(drop_reason(m) for m in messages)
        assert len(messages) == want["messages"], name
        for reason, n in want.items():
            if reason != "messages":
                assert reasons[reason] == n, (name, reason)
        assert reasons[None] > 40, name
        assert not warnings, warnings.summary()
        assert all(m.user_name and m.user_name != "unknown-user" for m in messages if drop_reason(m) is None)


def test_public_export_as_zip(public_exports: dict[str, Path], tmp_path: Path) -> None:
    folder = public_exports["sev_testarchive_2016"]
    archive = Path(
        shutil.make_archive(str(tmp_path / "sev"), "zip", folder.parent, folder.name)
    )  # one top folder
    zipped, _ = read_all(archive)
    plain, _ = read_all(folder)
    assert [(m.channel.name, m.ts, m.text) for m in zipped] == [(m.channel.name, m.ts, m.text) for m in plain]


# ---- hostile input -----------------------------------------------------------------------------------


def deep_json(depth: int) -> bytes:
    return b'[{"type": "message", "ts": "1.000001", "text": ' + b"[" * depth + b"]" * depth + b"}]"


def test_json_nested_200000_deep_is_a_skipped_file_not_a_crash(tmp_path: Path) -> None:
    root = write_export(
        tmp_path / "x",
        {
            "users.json": b"[" * 200_000 + b"]" * 200_000,
            "channels.json": CHANNELS,
            "general/2021-01-01.json": deep_json(200_000),
            "general/2021-01-02.json": [msg("1609545600.000001", "still read")],
        },
    )
    messages, warnings = read_all(root)
    assert [m.text for m in messages] == ["still read"]
    assert warnings.counts == {"bad_metadata": 1, "bad_day_file": 1, "unknown_user": 1}
    assert "nested deeper than the parser's limit" in warnings.examples["bad_day_file"][0].detail
    assert "2021-01-01.json" in warnings.examples["bad_day_file"][0].where


def nested(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def rich_list(depth: int) -> dict:
    """A rich_text_list nested ``depth`` lists deep, with the text 'deepest' at the bottom."""
    element: dict = {"type": "rich_text_section", "elements": [{"type": "text", "text": "deepest"}]}
    for _ in range(depth):
        element = {"type": "rich_text_list", "style": "bullet", "elements": [element]}
    return element


# (message fields, the text read, malformed_item warnings): every malformed part is skipped, never quoted.
MALFORMED = [
    ({"attachments": {"a": MARKER}}, "", 1),
    ({"attachments": [MARKER, {"text": "kept"}]}, "kept", 1),
    ({"attachments": [{"text": "t", "fields": 7}]}, "t", 1),
    ({"attachments": [{"fields": [MARKER, {"title": "k", "value": "v"}]}]}, "k: v", 1),
    ({"blocks": MARKER}, "", 1),
    ({"blocks": [{"type": "rich_text", "elements": 7}]}, "", 1),
    (
        {"blocks": [{"type": "rich_text", "elements": [{"type": "rich_text_section", "elements": MARKER}]}]},
        "",
        1,
    ),
    ({"blocks": [{"type": "section", "fields": 3, "text": {"type": "mrkdwn", "text": "s"}}]}, "s", 1),
    # a text that is a 900-deep list: str() of it would recurse (and quote it)
    (
        {
            "blocks": [
                {
                    "type": "rich_text",
                    "elements": [
                        {
                            "type": "rich_text_section",
                            "elements": [
                                {"type": "text", "text": nested(900, MARKER)},
                                {"type": "text", "text": "ok"},
                            ],
                        }
                    ],
                }
            ]
        },
        "ok",
        1,
    ),  # fmt: skip
    ({"blocks": [{"type": "rich_text", "elements": [rich_list(100)]}]}, "- " * 31, 1),
    ({"text": {"t": MARKER}, "attachments": [{"text": "att"}]}, "att", 1),
]


@pytest.mark.parametrize(("fields", "text", "n_warnings"), MALFORMED)
def test_parts_of_the_wrong_json_type_are_skipped_with_a_counted_warning(
    tmp_path: Path, fields: dict, text: str, n_warnings: int
) -> None:
    item = {"type": "message", "user": "U1", "ts": "1609459200.000001", "text": "", **fields}
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": [item]}
    )
    messages, warnings = read_all(root)
    assert len(messages) == 1 and messages[0].text.strip() == text.strip()
    assert warnings.counts == {"malformed_item": n_warnings}
    assert MARKER not in json.dumps(warnings.summary())
    assert warnings.examples["malformed_item"][0].detail.startswith("message 1609459200.000001: ")


def test_files_reactions_and_subtype_of_the_wrong_type(tmp_path: Path) -> None:
    day = [
        msg("1.000001", "a", files=MARKER, reactions={"name": MARKER}),
        msg("1.000002", "b", file=[MARKER], files=[7, {"id": "F1", "name": "f.txt"}], reactions=[MARKER]),
        msg("1.000003", "c", subtype=[MARKER]),
        msg("1.000004", "d", subtype=MARKER),
        msg("1.000005", "e", thread_ts={"ts": MARKER}),
    ]
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": day}
    )
    messages, warnings = read_all(root)
    by_ts = {m.ts: m for m in messages}
    assert by_ts["1.000001"].files == [] and by_ts["1.000001"].reactions == []
    assert by_ts["1.000002"].files == ["f.txt"]
    assert drop_reason(by_ts["1.000003"]) == drop_reason(by_ts["1.000004"]) == "subtype:malformed"
    assert by_ts["1.000005"].thread_ts is None  # read outside any thread
    assert warnings.counts == {"malformed_item": 8}
    assert MARKER not in json.dumps(warnings.summary())


@pytest.mark.parametrize(
    "ts",
    [
        "inf",
        "nan",
        "-1",
        "-1609459200.000001",
        "1e400",
        "9" * 400,
        "abc",
        " 1609459200.1",
        "1_609_459_200",
        "",
        None,
        True,
        [1.5],
        {"ts": 1},
        -5,
        1e300,
        10**400,
    ],  # fmt: skip
)
def test_invalid_ts_values_are_rejected_per_message(tmp_path: Path, ts: object) -> None:
    raw = json.dumps([msg("1609459200.000001", "good"), {**msg("x", "bad"), "ts": ts}]).encode()
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": raw}
    )
    messages, warnings = read_all(root)
    assert [m.text for m in messages] == ["good"]
    assert warnings.counts == {"bad_ts": 1}
    assert warnings.examples["bad_ts"][0].detail.startswith("item 1: ts is ")


def test_json_infinity_and_nan_ts_are_rejected(tmp_path: Path) -> None:
    # Python's json reads the non-standard tokens Infinity / NaN: they must not become times.
    raw = b'[{"type": "message", "user": "U1", "text": "a", "ts": Infinity},' + (
        b' {"type": "message", "user": "U1", "text": "b", "ts": NaN},'
        b' {"type": "message", "user": "U1", "text": "c", "ts": 1609459200.5}]'
    )
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": raw}
    )
    messages, warnings = read_all(root)
    assert [(m.text, m.ts) for m in messages] == [("c", "1609459200.500000")]
    assert warnings.counts == {"bad_ts": 2}


def test_symlinks_out_of_the_export_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "chan").mkdir(parents=True)
    (outside / "day.json").write_text(json.dumps([msg("1609459200.000009", MARKER)]))
    (outside / "chan" / "2021-01-01.json").write_text(json.dumps([msg("1609459200.000008", MARKER)]))
    (outside / "users.json").write_text(json.dumps([{"id": "U1", "name": MARKER}]))
    root = write_export(
        tmp_path / "x",
        {
            "channels.json": [*CHANNELS, {"id": "C2", "name": "linked"}, {"id": "C3", "name": "inside"}],
            "general/2021-01-01.json": [msg("1609459200.000001", "real")],
            "inside/2021-01-01.json": [msg("1609459200.000002", "real too")],
        },
    )
    (root / "users.json").symlink_to(outside / "users.json")
    (root / "general" / "2021-01-02.json").symlink_to(outside / "day.json")
    (root / "linked").symlink_to(outside / "chan", target_is_directory=True)
    (root / "general" / "2021-01-03.json").symlink_to(root / "inside" / "2021-01-01.json")  # inside: read
    warnings = Warnings()
    with open_export(root, warnings) as src:
        users = load_users(src, warnings)
        channels = list_channels(src, warnings=warnings)
        messages = [m for c in channels for m in iter_messages(src, c, users, warnings)]
    assert sorted(m.text for m in messages) == ["real", "real too", "real too"]
    assert MARKER not in repr(messages) + repr(users)
    assert warnings.counts["symlink_outside_export"] == 3
    refused = sorted(Path(w.where).name for w in warnings.examples["symlink_outside_export"])
    assert refused == ["2021-01-02.json", "linked", "users.json"]


# ---- zips that cannot be read safely -------------------------------------------------------------------


EXPORT_FILES = [stored("users.json", USERS), stored("channels.json", CHANNELS)]


def test_a_2_mb_zip_bomb_is_refused_before_anything_is_inflated(tmp_path: Path) -> None:
    bomb = deflate_bomb(2)
    assert len(bomb) < 2_200_000
    day = ("general/2021-01-01.json", bomb, 0, 2 << 30, zipfile.ZIP_DEFLATED, 0)
    path = raw_zip(tmp_path / "bomb.zip", [*EXPORT_FILES, day])
    with pytest.raises(SlackdistError, match=r"bomb.zip: general/2021-01-01.json expands .* zip bomb"):
        read_all(path)


def test_a_member_that_lies_about_its_size_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    # Declares 100 bytes (no ratio to refuse) but inflates to 1 GiB: zipfile stops at the declared size,
    # and our chunked read never asks it to inflate more than 1 MiB at a time. Its CRC is of 1 GiB, so
    # the 100 bytes read fail the check: a damaged zip, one line.
    day = ("general/2021-01-01.json", deflate_bomb(1), 0x2144DF1C, 100, zipfile.ZIP_DEFLATED, 0)
    path = raw_zip(tmp_path / "liar.zip", [*EXPORT_FILES, day])
    with pytest.raises(SlackdistError, match=r"liar.zip:general/2021-01-01.json: damaged zip member .*CRC"):
        read_all(path)


def test_zip_total_and_file_size_limits(tmp_path: Path, sample_export_zip: Path) -> None:
    with pytest.raises(
        SlackdistError, match=r"expands to .* GiB, over the .* limit; unzip it and pass the folder"
    ):
        with open_export(sample_export_zip, limits=ExportLimits(max_zip_total_bytes=1000)):
            pass
    path = raw_zip(
        tmp_path / "big.zip", [*EXPORT_FILES, stored("general/2021-01-01.json", [msg("1.1")] * 50)]
    )
    for source in (
        path,
        write_export(
            tmp_path / "dir", {"channels.json": CHANNELS, "general/2021-01-01.json": [msg("1.1")] * 50}
        ),
    ):
        warnings = Warnings()
        with open_export(source, warnings, ExportLimits(max_file_bytes=1000)) as src:
            channel = list_channels(src)[0]
            assert list(iter_messages(src, channel, {}, warnings)) == []
        assert warnings.counts["file_too_large"] == 1
        assert "over the 0.0 MiB limit for one JSON file" in warnings.examples["file_too_large"][0].detail


def encrypted_zip(path: Path) -> Path:
    """A real ZipCrypto-encrypted export, written by the zip tool (zipfile cannot encrypt)."""
    src = write_export(
        path.parent / "plain",
        {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": [msg("1.1")]},
    )
    subprocess.run(["zip", "-q", "-r", "-P", "secret", str(path), "."], cwd=src, check=True)
    return path


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("encrypted", r"x.zip: channels.json is encrypted; password-protected zips are not supported"),
        ("bzip2", r"uses bzip2 compression; only stored and deflate are read"),
        ("lzma", r"uses lzma compression; only stored and deflate are read"),
        ("deflate64", r"uses deflate64 compression; only stored and deflate are read"),
        ("bad_crc", r"x.zip:general/2021-01-01.json: damaged zip member \(Bad CRC-32"),
        ("corrupt_stream", r"x.zip:general/2021-01-01.json: damaged zip member \(Error -3"),
        ("truncated", r"x.zip: cannot read the zip|x.zip: not a folder or a .zip file"),
    ],
)
def test_unreadable_zips_are_one_line_errors_naming_the_file(tmp_path: Path, kind: str, needle: str) -> None:
    path = tmp_path / "x.zip"
    day = [msg("1609459200.000001", "hello " * 50)]
    if kind == "encrypted":
        if shutil.which("zip") is None:
            pytest.skip("no zip tool")
        encrypted_zip(path)
    elif kind in ("bzip2", "lzma"):
        method = zipfile.ZIP_BZIP2 if kind == "bzip2" else zipfile.ZIP_LZMA
        with zipfile.ZipFile(path, "w", compression=method) as zf:
            zf.writestr("channels.json", json.dumps(CHANNELS))
            zf.writestr("general/2021-01-01.json", json.dumps(day))
    elif kind == "deflate64":
        name, data, crc, size, _, flags = stored("general/2021-01-01.json", day)
        raw_zip(path, [*EXPORT_FILES, (name, data, crc, size, 9, flags)])
    elif kind == "bad_crc":
        name, data, crc, size, method, flags = stored("general/2021-01-01.json", day)
        raw_zip(path, [*EXPORT_FILES, (name, data, crc ^ 1, size, method, flags)])
    elif kind == "corrupt_stream":
        raw = json.dumps(day).encode()
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        data = bytearray(co.compress(raw) + co.flush())
        data[0] ^= 0xFF  # an invalid block type
        raw_zip(
            path, [*EXPORT_FILES, ("general/2021-01-01.json", bytes(data), zlib.crc32(raw), len(raw), 8, 0)]
        )
    else:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("channels.json", json.dumps(CHANNELS))
            zf.writestr("general/2021-01-01.json", json.dumps(day))
        path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(SlackdistError, match=needle) as caught:
        read_all(path)
    assert "\n" not in str(caught.value)


# ---- a file share appears once ------------------------------------------------------------------------


def test_a_file_is_named_once_per_message(tmp_path: Path) -> None:
    one = {"id": "F1", "name": "plan.pdf", "permalink": "https://x.slack.com/files/U1/F1/plan.pdf"}
    day = [
        msg("1.000001", "both forms", subtype="file_share", file=one, files=[one]),
        msg(
            "1.000002",
            "listed twice",
            subtype="file_share",
            files=[one, dict(one), {"id": "F2", "name": "b.png"}],
        ),
        msg(
            "1.000003",
            "<@U1> uploaded a file: <https://x.slack.com/files/U1/F1/plan.pdf|Plan>",
            subtype="file_share",
            file=one,
        ),
        msg(
            "1.000004",
            "same name, other files",
            files=[{"id": "F3", "name": "a.txt"}, {"id": "F4", "name": "a.txt"}],
        ),
    ]
    root = write_export(
        tmp_path / "x", {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": day}
    )
    messages, warnings = read_all(root)
    assert [m.files for m in messages] == [["plan.pdf"], ["plan.pdf", "b.png"], [], ["a.txt", "a.txt"]]
    assert not warnings


# ---- bots and integration feeds --------------------------------------------------------------------------


def test_bots_are_kept_with_include_bots_except_integration_feeds(sample_export_dir: Path) -> None:
    messages, _ = read_all(sample_export_dir, channels=["random"])
    bots = [m for m in messages if drop_reason(m) == "bot"]
    # cards without text of their own (CI attachments, a standup app's section blocks) and Slackbot
    assert sorted(m.user_name for m in bots if m.is_feed) == ["Slackbot", "Standup App", "ci", "ci"]
    assert {m.text for m in bots if not m.is_feed} == {  # bots and apps that write text: speakers
        "Deployed v1.4.2 to production",
        "I am a bot user posting without a bot_id",
        "An app user posting without a bot_id",
        "Weekly digest is ready",
    }
    for m in bots:
        assert drop_reason(m, include_bots=True) == ("bot_feed" if m.is_feed else None)
        assert drop_reason(m, include_bots=True, include_feeds=True) is None
    added = by_text(messages, "added an integration")
    assert drop_reason(added, include_bots=True) == "system:bot_add"  # Slack's notices stay dropped


def test_short_reads_are_read_to_the_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_export(
        tmp_path / "x",
        {"users.json": USERS, "channels.json": CHANNELS, "general/2021-01-01.json": [msg("1.1", "whole")]},
    )
    expected, _ = read_all(root)
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 7)))  # as a network filesystem may
    messages, warnings = read_all(root)
    assert [m.text for m in messages] == [m.text for m in expected] == ["whole"] and not warnings


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(value=_JSON_VALUES, ensure_ascii=st.booleans())
def test_day_files_parse_as_the_standard_library_parses(value: object, ensure_ascii: bool) -> None:
    raw = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    assert repr(parse_json(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize(
    "raw",
    [
        b"[NaN]",
        b"[1e400]",
        b'["\\ud800"]',
        b"\xef\xbb\xbf[1]",
        '["é"]'.encode("utf-16"),
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_what_orjson_refuses_reads_as_the_standard_library_reads_it(raw: bytes) -> None:
    try:
        expected: object = repr(json.loads(raw))
    except RecursionError:
        expected = RecursionError
    try:
        got: object = repr(parse_json(raw))
    except RecursionError:
        got = RecursionError
    assert got == expected
