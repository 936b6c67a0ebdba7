"""slackdist.slack.markup: mrkdwn -> plain text, code untouched, idempotent, nothing raw left."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slackdist.slack.markup import (
    _EMOJI_RE,
    MarkupContext,
    clean_text,
    code_blocks,
    decode_entities,
    emoji_for,
    find_raw_markup,
    format_reactions,
    split_code,
)

CTX = MarkupContext(
    users={"U0ADA0001": "Ada Lovelace", "U0GRACE01": "Grace Hopper", "W0GRID001": "Grid User"},
    channels={"C0GENERAL1": "general", "C0ENGINEE1": "engineering"},
)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("hi <@U0ADA0001>", "hi @Ada Lovelace"),
        ("hi <@U0ADA0001|ada>", "hi @Ada Lovelace"),  # the users table wins over the old-style label
        ("hi <@W0GRID001>", "hi @Grid User"),  # Enterprise Grid ids
        ("hi <@U0NOBODY1>", "hi @unknown-user"),  # never the raw id
        ("hi <@U0NOBODY1|casper>", "hi @casper"),  # unknown id but a label: the label
        ("see <#C0GENERAL1>", "see #general"),
        ("see <#C0XXXXXX1|random>", "see #random"),
        ("see <#C0XXXXXX1>", "see #unknown-channel"),
        ("<!here> <!channel> <!everyone>", "@here @channel @everyone"),
        ("<!here|here> <!channel|@channel>", "@here @channel"),
        ("<!subteam^S0INFRA01|@infra-team> ping", "@infra-team ping"),
        ("<!subteam^S0INFRA01> ping", "@team ping"),
        ("due <!date^1614729600^{date_short_pretty} at {time}|Tuesday 4pm>", "due Tuesday 4pm"),
        ("due <!date^1614729600^{date}>", "due 2021-03-03 00:00 UTC"),
        ("<https://x.y>", "https://x.y"),
        ("<https://x.y|label>", "label (https://x.y)"),
        ("<https://x.y|https://x.y>", "https://x.y"),
        ("<http://example.com|example.com>", "http://example.com"),
        ("<https://x.y/?a=1&amp;b=2|a &amp; b>", "a & b (https://x.y/?a=1&b=2)"),
        ("<mailto:a@b.c|a@b.c>", "a@b.c"),
        ("<mailto:a@b.c|write to me>", "write to me (a@b.c)"),
        ("<tel:+15551234|call us>", "call us (+15551234)"),
        ("a &amp; b &lt; c &gt; d", "a & b < c > d"),
        ("&amp;lt;", "<"),  # decoded to a fixed point
        ("a <b> c < d > e", "a <b> c < d > e"),  # literal angle brackets (after decoding) stay
        ("&lt;@U0ADA0001&gt; typed literally", "@Ada Lovelace typed literally"),  # no raw markup survives
        ("great :tada: :+1: :thumbsup::skin-tone-2:", "great 🎉 👍 👍🏻"),
        (":partyparrot: stays", ":partyparrot: stays"),
        ("at 12:30:45 and 1:100:2", "at 12:30:45 and 1:100:2"),  # numbers are not emoji
        (":tada::tada:", "🎉🎉"),
        ("¡Hola! 確認しました شكراً Привет 👍", "¡Hola! 確認しました شكراً Привет 👍"),
        ("", ""),
    ],
)
def test_clean_text_rules(raw: str, clean: str) -> None:
    assert clean_text(raw, CTX) == clean


def test_code_is_left_as_written_except_entities() -> None:
    raw = (
        "fix:\n```if a &lt; b &amp;&amp; <@U0ADA0001>:\n    go(<https://x.y|docs>) :tada:```\n"
        "inline `x &lt;= 3 <#C0GENERAL1> :tada:` and <@U0ADA0001> :tada:"
    )
    out = clean_text(raw, CTX)
    assert "```if a < b && <@U0ADA0001>:\n    go(<https://x.y|docs>) :tada:```" in out
    assert "`x <= 3 <#C0GENERAL1> :tada:`" in out
    assert out.endswith("and @Ada Lovelace 🎉")
    assert find_raw_markup(out) == []


def test_emoji_switch_off_keeps_short_names() -> None:
    ctx = MarkupContext(users={}, channels={}, emoji_unicode=False)
    assert clean_text("nice :tada:", ctx) == "nice :tada:"


def test_from_users_is_a_live_view() -> None:
    from slackdist.slack.metadata import Channel, UserInfo

    users = {"U1": UserInfo(id="U1", name="Ada")}
    ctx = MarkupContext.from_users(users, [Channel("C1", "general", "public", "general")])
    users["U2"] = UserInfo(id="U2", name="Grace")  # learned later from a user_profile
    assert clean_text("<@U1> <@U2> <#C1>", ctx) == "@Ada @Grace #general"


def test_names_cannot_inject_code_or_markup() -> None:
    ctx = MarkupContext(users={"U1": "evil ``` <@U1>"}, channels={})
    out = clean_text("hi <@U1> ```code```", ctx)
    assert code_blocks(out) == ["code"]
    assert find_raw_markup(out) == []


def test_format_reactions() -> None:
    reactions = [("+1", 3), ("tada", 1), ("partyparrot", 2), ("thumbsup::skin-tone-2", 1)]
    assert format_reactions(reactions) == "[reactions: 👍 3, 🎉 1, :partyparrot: 2, 👍🏻 1]"
    assert format_reactions(reactions, min_count=2) == "[reactions: 👍 3, :partyparrot: 2]"
    assert (
        format_reactions(reactions, min_count=2, emoji_unicode=False)
        == "[reactions: :+1: 3, :partyparrot: 2]"
    )
    assert format_reactions([], 1) == ""
    assert format_reactions([("eyes", 1)], min_count=5) == ""


def test_emoji_for() -> None:
    assert emoji_for("+1") == "👍"
    assert emoji_for("white_check_mark") == "✅"
    assert emoji_for("not_an_emoji_name") is None
    assert emoji_for("+1::skin-tone-9") is None


def test_helpers_for_the_report() -> None:
    text = "a <@U1> ```x &lt; <@U2>``` b `<#C1>` &amp; <https://x>"
    assert code_blocks(text) == ["x &lt; <@U2>"]
    assert find_raw_markup(text) == ["<@U1>", "&amp;", "<https://x>"]
    assert [is_code for is_code, _ in split_code(text)] == [False, True, False, True, False]
    assert "".join(chunk for _, chunk in split_code(text)) == text
    assert decode_entities("&amp;amp; &lt;&gt; &quot;") == "& <> &quot;"


@pytest.mark.parametrize(
    "raw",
    [
        "<<@U0ADA0001>>",
        "&amp;lt;<@U0ADA0001>&gt;",
        "`<@U0ADA0001|\n>````<@U0ADA0001>```",
        "<https://x|a`b> `c`",
    ],
)
def test_regressions_found_by_hypothesis(raw: str) -> None:
    once = clean_text(raw, CTX)
    assert clean_text(once, CTX) == once
    assert find_raw_markup(once) == []
    assert code_blocks(once) == [decode_entities(b) for b in code_blocks(raw)]


# ---- property tests ------------------------------------------------------------------------------

_words = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_safe_words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<>|`"), max_size=12
)
_ids = st.sampled_from(
    ["U0ADA0001", "U0GRACE01", "U0NOBODY1", "W0GRID001", "C0GENERAL1", "C0XXXXXX1", "S0TEAM"]
)
_markup = st.one_of(
    st.builds(lambda i: f"<@{i}>", _ids),
    st.builds(lambda i, n: f"<@{i}|{n}>", _ids, _safe_words),
    st.builds(lambda i: f"<#{i}>", _ids),
    st.builds(lambda i, n: f"<#{i}|{n}>", _ids, _safe_words),
    st.sampled_from(
        ["<!here>", "<!channel>", "<!everyone>", "<!subteam^S1|@team>", "<!date^1614729600^{date}|Tue>"]
    ),
    st.builds(lambda p, lab: f"<https://ex.org/{p}|{lab}>", _safe_words, _safe_words),
    st.builds(lambda p: f"<http://ex.org/{p}>", _safe_words),
    st.builds(
        lambda a: f"<mailto:{a}@ex.org|{a}@ex.org>", st.text(alphabet="abcxyz", min_size=1, max_size=5)
    ),
    st.sampled_from(
        ["&amp;", "&lt;", "&gt;", "&amp;lt;", "&lt;@U0ADA0001&gt;", ":tada:", ":+1:", ":nope:", "::", ":"]
    ),
    st.sampled_from(["`", "```", "\n", " ", "<", ">", "|", "&"]),
)
_code = st.one_of(
    st.builds(lambda body: f"```{body}```", st.lists(st.one_of(_markup, _words), max_size=6).map("".join)),
    st.builds(
        lambda body: f"`{body}`",
        st.lists(st.one_of(_markup, _safe_words), min_size=1, max_size=4).map("".join),
    ),
)
slack_text = st.lists(st.one_of(_markup, _code, _words), max_size=14).map("".join)
any_text = st.one_of(st.text(max_size=200), slack_text)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(any_text)
def test_idempotent(text: str) -> None:
    once = clean_text(text, CTX)
    assert clean_text(once, CTX) == once


@PROPS
@given(any_text)
def test_no_markup_or_escapes_left_outside_code(text: str) -> None:
    assert find_raw_markup(clean_text(text, CTX)) == []


@PROPS
@given(slack_text)
def test_code_blocks_survive_byte_for_byte_after_decoding(text: str) -> None:
    out = clean_text(text, CTX)
    blocks = [decode_entities(b) for b in code_blocks(text)]
    for block in blocks:
        assert f"```{block}```" in out
    assert code_blocks(out) == blocks


@PROPS
@given(st.text(max_size=300))
def test_never_crashes_and_keeps_plain_text(text: str) -> None:
    out = clean_text(text, CTX)
    assert isinstance(out, str)
    if not any(c in text for c in "<&:"):
        assert out == text  # nothing to rewrite: the fast path returns the text as is


_names = st.lists(
    st.sampled_from([*"ab :&;<>`@#!|", "&amp;", "&lt;", "&gt;", "<@U0ADA0001>", ":tada:"]), max_size=8
).map("".join)


@PROPS
@given(slack_text, _names, _names)
def test_idempotent_and_clean_with_hostile_names(text: str, user_name: str, channel_name: str) -> None:
    ctx = MarkupContext(users={"U0ADA0001": user_name}, channels={"C0GENERAL1": channel_name})
    once = clean_text(text, ctx)
    assert clean_text(once, ctx) == once
    assert find_raw_markup(once) == []
    assert code_blocks(once) == [decode_entities(b) for b in code_blocks(text)]


@given(st.text(alphabet="ab1Z9:_+-' \n", max_size=30))
def test_emoji_pattern_finds_what_a_leading_lookbehind_finds(text: str) -> None:
    # _EMOJI_RE puts its lookbehind after the first ':' (for speed); it must find the same matches.
    leading = re.compile(r"(?<![A-Za-z0-9]):([a-z0-9_+'\-]+):(?![A-Za-z0-9])")
    spans = [(m.span(), m.group(1)) for m in _EMOJI_RE.finditer(text)]
    assert spans == [(m.span(), m.group(1)) for m in leading.finditer(text)]


# ---- hostile input: entity chains decode in linear time, to the same text as before --------------


def replace_until_fixed(text: str) -> str:
    """The earlier decoder, one pass per nesting level (quadratic on long chains): the reference."""
    while "&" in text and ("&amp;" in text or "&lt;" in text or "&gt;" in text):
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text


_entity_bits = st.lists(
    st.sampled_from(["&", "amp;", "lt;", "gt;", "&amp;", "&lt;", "&gt;", "a", "m", "p", "l", "t", ";", "x"]),
    max_size=30,
).map("".join)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(_entity_bits, any_text))
def test_decode_entities_equals_replacing_until_nothing_is_left(text: str) -> None:
    decoded = decode_entities(text)
    assert decoded == replace_until_fixed(text)
    assert decode_entities(decoded) == decoded


@pytest.mark.parametrize(
    ("chain", "decoded"),
    [
        ("&" + "amp;" * 250_000 + "lt;", "<"),  # 1 MB: the old decoder needed 250,000 passes over it
        ("&" + "amp;" * 250_000 + "gt;", ">"),
        ("&" + "amp;" * 250_000, "&"),
        ("&amp;" * 200_000, "&" * 200_000),
        ("&" + "amp;" * 100_000 + "lt;@U0ADA0001&" + "amp;" * 100_000 + "gt;", "@Ada Lovelace"),
    ],
)
def test_long_entity_chains(chain: str, decoded: str) -> None:
    assert clean_text(chain, CTX) == decoded
    assert clean_text(decoded, CTX) == decoded
