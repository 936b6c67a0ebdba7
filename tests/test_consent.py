"""Consent at prepare time: `--exclude-users` / `--only-users` leave no trace of a person, and change
nothing else for everyone else's messages.

The traces checked: user id, user, display, real and given name, e-mail, the text of their messages
(their own, shared or quoted as an attachment, in a thread_broadcast), mentions, reactions, files
they uploaded, a group DM's folder name, the report's config and previews, the provenance.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from export_helpers import msg, write_export
from hypothesis import given, settings
from hypothesis import strategies as st
from script_helpers import load_bench

from slackdist.config import DataConfig
from slackdist.data.prepare import prepare
from slackdist.data.provenance import PROVENANCE_FILE
from slackdist.errors import SlackdistError
from slackdist.slack.consent import SOMEONE, Consent, hashed_user_id, resolve_people
from slackdist.slack.export import open_export
from slackdist.slack.messages import drop_reason, iter_messages
from slackdist.slack.metadata import UserInfo, list_channels, load_users
from slackdist.slack.warnings import Warnings

SAMPLE = Path(__file__).parent / "fixtures" / "sample_export"

GONE = "UXAN00001"


def user(uid: str, name: str, real: str, display: str = "", email: str = "") -> dict:
    return {"id": uid, "name": name, "real_name": real,
            "profile": {"real_name": real, "display_name": display, "email": email}}  # fmt: skip


USERS = [
    user(GONE, "xander", "Xander Quill", "Xan Q", "xander.quill@example.com"),
    user("UYARA0001", "yara", "Yara Bell", email="yara@example.com"),
    user("UZED00001", "zed", "Zed Moss"),
    user("UWREN0001", "wren", "Wren Park"),
]
# Words of the left-out person's messages that no one else writes.
THEIR_TEXTS = ("give me ten minutes", "SHARED roadmap plan", "booked it myself", "remember the Tuesday window",
               "group chat line from him")  # fmt: skip


def consent_export(root: Path) -> Path:
    """Every way a person's words or name reach other people's messages, in a channel, a thread and a group DM."""
    t = 1614600000
    general = [
        msg(f"{t}.000100", "morning all, who can look at the build?", "UYARA0001"),
        msg(f"{t + 60}.000100", "I can take the build, give me ten minutes to finish lunch first", GONE),
        msg(f"{t + 120}.000100", "thanks <@UXAN00001>! also ping <@UXAN00001|xander> if it fails", "UZED00001"),
        msg(f"{t + 180}.000100", "xander said so yesterday; mail xander.quill@example.com or ask Xander Quill",
            "UYARA0001"),
        msg(f"{t + 240}.000100", "", "UWREN0001", attachments=[
            {"author_id": GONE, "author_name": "Xan Q", "text": "SHARED roadmap plan", "fallback": "SHARED roadmap plan"}]),
        msg(f"{t + 300}.000100", "nice one", "UZED00001",
            reactions=[{"name": "+1", "users": [GONE, "UYARA0001"], "count": 2},
                       {"name": "tada", "users": [GONE], "count": 1}]),
        msg(f"{t + 360}.000100", "see this", "UYARA0001", subtype="file_share",
            files=[{"id": "F1", "name": "xander-notes.pdf", "user": GONE}, {"id": "F2", "name": "plan.txt", "user": "UYARA0001"}]),
        msg(f"{t + 420}.000100", "run this:\n```\nssh xander@build-host\n```", "UZED00001"),
        msg(f"{t + 480}.000100", "thread question about the deploy window?", "UYARA0001",
            thread_ts=f"{t + 480}.000100", reply_count=3),
        msg(f"{t + 540}.000100", "the deploy window is Tuesday at noon, booked it myself", GONE,
            thread_ts=f"{t + 480}.000100"),
        msg(f"{t + 600}.000100", "remember the Tuesday window", GONE, subtype="thread_broadcast",
            thread_ts=f"{t + 480}.000100"),
        msg(f"{t + 660}.000100", "ok noted, thanks", "UWREN0001", thread_ts=f"{t + 480}.000100",
            root={"user": GONE, "text": "remember the Tuesday window", "ts": f"{t + 480}.000100"}),
    ]  # fmt: skip
    group = [
        msg(f"{t + 100}.000200", "group chat hello", "UYARA0001"),
        msg(f"{t + 160}.000200", "group chat line from him", GONE),
        msg(f"{t + 220}.000200", "group chat reply", "UZED00001"),
        msg(f"{t + 280}.000200", "and one more", "UYARA0001"),
    ]
    return write_export(
        root,
        {
            "users.json": USERS,
            "channels.json": [{"id": "C0GEN0001", "name": "general"}],
            "mpims.json": [
                {
                    "id": "G0GRP0001",
                    "name": "mpdm-yara--xander--zed-1",
                    "members": ["UYARA0001", GONE, "UZED00001"],
                }
            ],  # fmt: skip
            "general/2021-03-01.json": general,
            "mpdm-yara--xander--zed-1/2021-03-01.json": group,
        },
    )


def output_text(out: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(out.iterdir()) if p.suffix != ".png")


def traces(text: str, forms: list[str]) -> list[str]:
    """The forms found in text as whole words (case-insensitive), as a test reads the output."""
    return [f for f in forms if re.search(rf"(?<!\w){re.escape(f)}(?!\w)", text, re.IGNORECASE)]


def test_no_trace_of_a_left_out_person_in_any_output_file(tmp_path: Path) -> None:
    export = consent_export(tmp_path / "export")
    cfg = DataConfig(include_dms=True, keep_emails=True, workers=1, exclude_users=["Xander Quill"])
    report = prepare(export, tmp_path / "out", cfg)
    text = output_text(tmp_path / "out")
    forms = [GONE, "xander", "Xan Q", "Xander Quill", "Xander", "Quill", "xander.quill@example.com"]
    assert traces(text, forms) == []
    assert [t for t in THEIR_TEXTS if t.casefold() in text.casefold()] == []
    records = [json.loads(line) for split in ("train", "validation", "test")
               for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]  # fmt: skip
    contents = "\n".join(m["content"] for r in records for m in r["messages"])
    assert "@someone! also ping @someone if it fails" in contents  # mentions, with and without a label
    assert (
        "someone said so yesterday; mail [EMAIL] or ask someone" in contents
    )  # typed names, e-mail kept off
    assert "ssh someone@build-host" in contents  # code too
    assert "[reactions: 👍 1]" in contents and "🎉" not in contents  # their reactions are not counted
    assert "[file: plan.txt]" in contents and "notes.pdf" not in contents
    assert "mpdm-yara--someone--zed-1" in text  # the group DM's folder name
    for r in records:
        assert set(r["meta"]["speakers"]) <= {"Yara Bell", "Zed Moss", "Wren Park"}
    # Their messages are counted, not quoted: 4 of them (#general 3, a thread reply and its broadcast
    # among them; the group DM 1).
    assert report.data["dropped"]["excluded_user"] == 4
    # The report's config names them by a hash keyed with the export, which `prepare` reads back.
    recorded = report.data["config"]["exclude_users"]
    assert len(recorded) == 1 and recorded[0].startswith("sha256:")
    again = prepare(export, tmp_path / "again", DataConfig(include_dms=True, keep_emails=True, workers=1,
                                                           exclude_users=recorded))  # fmt: skip
    assert again.data["dropped"]["excluded_user"] == 4
    assert (tmp_path / "again" / "train.jsonl").read_text() == (tmp_path / "out" / "train.jsonl").read_text()


def test_only_users_is_the_same_as_leaving_everyone_else_out(tmp_path: Path) -> None:
    export = consent_export(tmp_path / "export")
    base = dict(include_dms=True, workers=1)
    prepare(
        export,
        tmp_path / "only",
        DataConfig(**base, only_users=["yara", "zed@unknown", "wren"][::2] + ["Zed Moss"]),
    )
    prepare(export, tmp_path / "excl", DataConfig(**base, exclude_users=[GONE]))
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", PROVENANCE_FILE):
        assert (tmp_path / "only" / name).read_text() == (tmp_path / "excl" / name).read_text(), name


def test_nothing_left_names_nobody_left_out(tmp_path: Path) -> None:
    export = consent_export(tmp_path / "export")
    with pytest.raises(SlackdistError, match="no conversation left") as e:
        prepare(export, tmp_path / "out", DataConfig(only_users=["yara"], workers=1))
    assert traces(str(e.value), ["xander", "Xander Quill", "zed", "Zed Moss", GONE]) == []


def test_an_unknown_name_is_one_line_listing_the_closest(tmp_path: Path) -> None:
    export = consent_export(tmp_path / "export")
    with pytest.raises(SlackdistError) as e:
        prepare(export, tmp_path / "out", DataConfig(exclude_users=["Xandr Quill"]))
    message = str(e.value)
    assert "\n" not in message and "users.json" in message and "--exclude-users 'Xandr Quill'" in message
    assert "closest: Xander Quill" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SlackdistError, match="--as 'yara' is left out"):
        prepare(export, tmp_path / "out", DataConfig(persona="yara", exclude_users=["yara"]))


def test_names_resolve_by_every_form_case_insensitively() -> None:
    users = {u["id"]: _info(u) for u in USERS}
    for name in (GONE, "XANDER", "xan q", "Xander Quill", "@xander", "Xander.Quill@Example.com",
                 hashed_user_id("salt", GONE)):  # fmt: skip
        assert resolve_people([name], users, flag="--exclude-users", salt="salt", where="users.json") == {
            GONE
        }


def _info(d: dict) -> UserInfo:
    from slackdist.slack.metadata import user_from_dict

    info = user_from_dict(d)
    assert info is not None
    return info


NAMES = ["Xander Quill", "xander", "Xan Q", "UXAN00001", "xander.quill@example.com", "Xander"]
WORDS = st.sampled_from(
    ["the", "build", "is", "green", "Yara", "Bell", "zed", "xanderish", "quilled", "@", ",", "!"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(WORDS, st.sampled_from(NAMES).map(str.upper), st.sampled_from(NAMES)), max_size=20),
    st.sampled_from([" ", "\n", "-", "/", ", "]),
)
def test_scrub_replaces_each_form_and_nothing_else(words: list[str], sep: str) -> None:
    users = {u["id"]: _info(u) for u in USERS}
    consent = Consent.build(users, exclude=["xander"], salt="s", where="users.json")
    assert consent is not None
    out = consent.scrub(sep.join(words))
    replaced = {n.casefold(): "[EMAIL]" if "@" in n else SOMEONE for n in NAMES}
    assert out == sep.join(replaced.get(w.casefold(), w) for w in words)
    assert traces(out, NAMES) == [] and consent.scrub(out) == out


# ---- the shared real exports and the sample: nothing of them, and the same coverage for everyone else


@pytest.fixture(scope="module")
def bench():
    """bench/consent_bench.py, whose runs and counts the test below checks."""
    return load_bench("consent_bench")


def _human_messages_of(export: Path, user_ids: set[str]) -> int:
    """Human messages of these people in the conversations `prepare` reads (its own reader and rule)."""
    n = 0
    with open_export(export) as src:
        users = load_users(src)
        for channel in list_channels(src):
            for m in iter_messages(src, channel, dict(users), Warnings()):
                n += m.user_id in user_ids and drop_reason(m) is None
    return n


def _person_forms(export: Path, uid: str) -> list[str]:
    """The left-out person's names as a reader would look for them, less words another person's names share."""
    with open_export(export) as src:
        users = load_users(src)
    gone = users[uid]
    others = set()
    for u in users.values():
        if u.id != uid:
            for form in (u.username, u.display_name, u.real_name, u.name):
                others |= {form.casefold(), *(w.casefold() for w in re.findall(r"\w+", form))}
    forms = [gone.id, gone.email, gone.username, gone.display_name, gone.real_name]
    forms += gone.real_name.split()[:1] if len(gone.real_name.split()) > 1 else []
    return [
        f
        for f in dict.fromkeys(forms)
        if f and (f == gone.email or f == gone.id or f.casefold() not in others)
    ]


def _their_texts(export: Path, uid: str) -> list[str]:
    """Distinctive plain texts (30+ characters, no markup) of the person's messages."""
    texts = []
    with open_export(export) as src:
        users = load_users(src)
        for channel in list_channels(src):
            for m in iter_messages(src, channel, dict(users), Warnings()):
                if m.user_id == uid and len(m.text) >= 30 and not re.search(r"[<>&:`*_~]", m.text):
                    texts.append(m.text.strip())
    return texts


@pytest.fixture(scope="module")
def exports(public_exports: dict[str, Path]) -> dict[str, Path]:
    return {"sample_export": SAMPLE, **public_exports}


@pytest.mark.parametrize("name", ["sample_export", "houstondatavis_2016", "sev_testarchive_2016"])
def test_real_exports_leave_no_trace_and_keep_everyone_elses_coverage(
    bench, exports: dict[str, Path], name: str, tmp_path: Path
) -> None:
    export = exports[name]
    runs = bench.runs_without_busiest(export, tmp_path)
    gone, before, after = runs.gone, runs.before, runs.after

    text = output_text(tmp_path / "without")
    assert traces(text, _person_forms(export, gone)) == []
    assert [t for t in _their_texts(export, gone) if t in text] == []

    # Everyone else's messages: the same human messages; each reaches a turn with the flag exactly when
    # it did without, except the ones whose conversation had nobody else to talk to but the person.
    assert after["totals"]["human_messages"] == before["totals"]["human_messages"] - _human_messages_of(
        export, {gone}
    )
    others_reached, lost, with_them = bench.lost_and_with_them(runs)
    reached_before, reached_after = bench.reached(runs.entries_before), bench.reached(runs.entries_after)
    assert set(reached_after) <= others_reached
    assert lost == with_them
    # The report's own measurement agrees with the provenance.
    assert after["totals"]["covered_messages"] == len(reached_after)
    assert before["totals"]["covered_messages"] == len(reached_before)
    for e in runs.entries_after:
        assert gone not in e["users"] and gone not in e["mentions"]
