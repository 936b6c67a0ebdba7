"""slackdist.slack.secrets: every kind is found, only its value goes, code and lookalikes stay byte-identical."""

from __future__ import annotations

import random
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.redaction_corpus import GENERATORS, embed, lookalike_examples
from slackdist.slack.redact import KINDS, SECRET, Redactor
from slackdist.slack.secrets import RULES, SECRET_KINDS, STRONG, TOKENISH, Rule, SecretFinder, key_strength

# Generated credentials come from a seeded random.Random: hypothesis' own random shrinks towards one repeated
# character, and "aaaaaaaa" is a placeholder, not a credential.
_seeds = st.integers(0, 2**32 - 1)
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET_CORPUS_KINDS = [k for k in GENERATORS if k not in ("email", "phone")]


def redact(text: str) -> str:
    return Redactor(keep_emails=True, keep_phones=True).redact(text)[0]


# ---- one example per kind: found, counted under its kind, key names and surroundings kept ---------------------

HF = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"
OPENAI = "sk-proj-" + "Ab1" * 20 + "T3BlbkFJ" + "Xy9" * 20
ANTHROPIC = "sk-ant-api03-" + "Qw3-" * 23 + "xAA"
EXAMPLES = [
    # (text, kind, the value that must go, a part that must stay)
    ("DB_PASSWORD=hunter2hunter2", "password", "hunter2hunter2", "DB_PASSWORD="),
    ("POSTGRES_PASSWORD=Sup3r-S3cret!", "password", "Sup3r-S3cret!", "POSTGRES_PASSWORD="),
    ("export PGPASSWD=pg-pass-2024", "password", "pg-pass-2024", "export PGPASSWD="),
    ('  db_password: "Tr0ub4dor&3"', "password", "Tr0ub4dor&3", "db_password:"),
    ('{"client_secret": "x7Gh2kLq9ZpW"}', "password", "x7Gh2kLq9ZpW", '"client_secret": "'),
    ("password=abc&xyz", "password", "abc&xyz", "password="),
    ("SECRET_KEY_BASE=9f2c7a1e5b8d", "password", "9f2c7a1e5b8d", "SECRET_KEY_BASE="),
    ("MAPS_API_KEY=q8Wz3xLp0rTn5vYb2cKd", "password", "q8Wz3xLp0rTn5vYb2cKd", "MAPS_API_KEY="),
    ("<apiToken>a8F3kQz91LmXw2</apiToken>", "password", "a8F3kQz91LmXw2", "<apiToken>"),
    ("mysql --password s3cr3t-Pw", "password", "s3cr3t-Pw", "--password"),
    ("postgres://admin:S3cr3tPw@localhost/app", "url_password", "S3cr3tPw", "postgres://admin:"),
    ("amqp://user:Rabb1tPw@10.0.0.7:5672/", "url_password", "Rabb1tPw", "@10.0.0.7"),
    ("redis://:cachePw99@cache.internal:6379/0", "url_password", "cachePw99", "redis://:"),
    ("curl -u deploy:Dep10y-Pw https://ci.example.com", "basic_auth", "Dep10y-Pw", "curl -u deploy:"),
    (
        "Authorization: Basic ZGVwbG95OnMzY3IzdA==",
        "basic_auth",
        "ZGVwbG95OnMzY3IzdA==",
        "Authorization: Basic ",
    ),
    ("Authorization: Bearer abc123def456ghi789", "bearer", "abc123def456ghi789", "Authorization: Bearer "),
    ("Server=db;User Id=app;Password=Adm1n-Pw;", "password", "Adm1n-Pw", ";User Id=app;Password="),
    (
        "https://us02web.zoom.us/j/81234567890?pwd=Ym9vbXNIZVpVN3d6QUxl",
        "meeting_passcode",
        "Ym9vbXNIZVpVN3d6QUxl",
        "?pwd=",
    ),
    ("Meeting ID: 812 3456 7890\nPasscode: 482913", "meeting_passcode", "482913", "Passcode: "),
    ("token glpat-" + "aB3dE5fG7hI9jK1lM2nO", "gitlab_token", "glpat-aB3dE5fG7hI9jK1lM2nO", "token "),
    (f"HF_TOKEN={HF}", "huggingface_token", HF, "HF_TOKEN="),
    (f"key {OPENAI}", "openai_key", OPENAI, "key "),
    (f"key {ANTHROPIC}", "anthropic_key", ANTHROPIC, "key "),
    (
        "maps AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
        "gcp_key",
        "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
        "maps ",
    ),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe_key", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe "),
    ("sid AC" + "0123456789abcdef" * 2, "twilio_key", "AC" + "0123456789abcdef" * 2, "sid "),
    (
        "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",
        "sendgrid_key",
        "SG.ngeVfQFYQlKU0ufo8x5d1A",
        "",
    ),
    (
        "//registry.npmjs.org/:_authToken=npm_" + "a1B2c3D4e5" * 3 + "F6g7H8",
        "npm_token",
        "npm_a1B2c3D4e5",
        "_authToken=",
    ),
    (
        "TWINE_PASSWORD=pypi-AgEIcHlwaS5vcmc" + "Ab1_-" * 20,
        "pypi_token",
        "pypi-AgEIcHlwaS5vcmcAb1_-",
        "TWINE_PASSWORD=",
    ),
    (
        "AccountKey=" + "Zm9vYmFy" * 11 + ";EndpointSuffix=core.windows.net",
        "azure_key",
        "Zm9vYmFy" * 11,
        ";EndpointSuffix",
    ),
    ("id ABIA" + "QWERTYUIOPASDFGH", "aws_key", "ABIAQWERTYUIOPASDFGH", "id "),
    (
        "AKIA2E0A8F3B244C9986 / tG7kq9Zp+W2xLr8Nv5Bc1Hd4Jf6Ks3Mu0Py/QaRe",
        "aws_key",
        "tG7kq9Zp+W2xLr8Nv5Bc1Hd4Jf6Ks3Mu0Py/QaRe",
        " / ",
    ),
    ("cookie xoxd-" + "aB3%2Fc" * 20, "slack_token", "xoxd-aB3%2Fc", "cookie "),
    (
        "hook http://hooks.slack.com/services/T0000/B0000/XXXXabc123",
        "slack_token",
        "hooks.slack.com/services/T0000",
        "hook ",
    ),
    (
        "hooks.slack.com/services/T0000/B0000/XXXXabc123 is the hook",
        "slack_token",
        "B0000/XXXXabc123",
        " is the hook",
    ),
    ("eyJhbGciOiJub25lIn0.eyJzdWIiOiIxMjM0In0. unsigned", "jwt", "eyJzdWIiOiIxMjM0In0", " unsigned"),
    (
        "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk\n-----END EC PRIVATE KEY-----",
        "private_key",
        "MHcCAQEEIBkg4LVWM9nuwNSk",
        "",
    ),
    (
        '"private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0B\\n-----END PRIVATE KEY-----\\n"',
        "private_key",
        "MIIEvQIBADANBgkqhkiG9w0B",
        '"private_key": "',
    ),
    ("ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "github_token", "ghp_A1b2C3d4E5f6", ""),
    # a value followed by a comma is not a type annotation (``key: RSAKey, …``) when it ends in _digits
    (
        "ok so rabbitmq_default_pass: BlueLqwVKyEklg_55, then restart",
        "password",
        "BlueLqwVKyEklg_55",
        "rabbitmq_default_pass: ",
    ),
    # an XML element named for a key, with a token-shaped value
    (
        "<encryptionKey>RmgFGWTQA0FC6jcvVuELL3Q0C084HZLXWayxAnhf</encryptionKey>",
        "password",
        "RmgFGWTQA0FC6jcvVuELL3Q0C084HZLXWayxAnhf",
        "</encryptionKey>",
    ),
]


@pytest.mark.parametrize(("text", "kind", "value", "kept"), EXAMPLES)
def test_each_kind_is_found_and_only_its_value_goes(text: str, kind: str, value: str, kept: str) -> None:
    out, counts = Redactor().redact(text)
    assert value not in out
    assert SECRET in out and kept in out
    assert counts[kind] >= 1 and set(counts) <= set(KINDS)


def test_every_kind_is_documented_in_the_readme() -> None:
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text()
    for kind in KINDS:
        assert f"`{kind}`" in readme, kind


# ---- code expressions, lookalikes and ordinary chat stay byte-identical -----------------------------------

UNCHANGED = [
    "password = getpass.getpass()",
    'token = os.environ["X"]',
    "const apiKey = config.apiKey;",
    'auth = request.headers.get("Authorization")',
    "password: str",
    "api_key=None",
    "token=token",
    "def login(user: str, password: str | None = None) -> Session:",
    "self.secret_key = settings.SECRET_KEY",
    'headers = {"Authorization": f"Bearer {token}"}',
    "tokenizer = AutoTokenizer.from_pretrained(name)",
    "max_tokens=1024, temperature=0.2",
    'pad_token="<pad>", eos_token="</s>", mask_token="[MASK]"',
    "DB_PASSWORD=${DB_PASSWORD}",
    'password = "{password}"',
    "postgres://user:${PGPASSWORD}@db/app",
    "sort_key = 'created_at'",
    "key: RSAKey, item: FreeIfNotReusedLine",
    "First pass: decided_mask==0, every element participates.",
    "the secret: we ship Friday; the token bucket refills every 100 ms",
    "docker run -u 1000:1000 image",
    "git push -u origin main",
    "I forgot my password again, resetting it now",
    "cuda_max_grid = (2147483647, 65535, 65535)",
    "[3414372578, 3437564012, 2112038651]",
    "<key>CFBundleIdentifier</key>",
    "<primaryKey>order_id</primaryKey><sortKey>created_at</sortKey>",
    "<encryptionKey>${ENCRYPTION_KEY}</encryptionKey>",
]


@pytest.mark.parametrize("text", UNCHANGED)
def test_code_expressions_and_prose_stay_byte_identical(text: str) -> None:
    assert Redactor().redact(text) == (text, {})


@pytest.mark.parametrize("example", list(lookalike_examples(seed=1, per_kind=25)), ids=lambda e: e.kind)
def test_lookalikes_stay_byte_identical(example) -> None:
    assert Redactor().redact(example.text)[0] == example.text


# ---- properties ---------------------------------------------------------------------------------------------

_surrounding = st.text(alphabet=string.ascii_letters + string.digits + " .,:;!?()\n-", max_size=40)


@PROPS
@given(
    st.sampled_from(SECRET_CORPUS_KINDS),
    _seeds,
    _surrounding,
    _surrounding,
    st.sampled_from(["sentence", "code", "link", "attachment", "reply", "fenced"]),
)
def test_every_generated_secret_never_survives(
    kind: str, seed: int, left: str, right: str, setting: str
) -> None:
    rng = random.Random(seed)
    snippet, values = GENERATORS[kind](rng)
    body = f"```\n{snippet}\n```" if setting == "fenced" else embed(rng, snippet, setting)
    text = f"{left} {body} {right}"
    out = redact(text)
    for value in values:
        if value not in left and value not in right:
            assert value not in out, (kind, text)


_hex = "0123456789abcdef"


@PROPS
@given(
    st.one_of(
        st.text(_hex, min_size=7, max_size=40),  # git SHAs, short and long
        st.builds(lambda *p: "-".join(p), *(st.text(_hex, min_size=n, max_size=n) for n in (8, 4, 4, 4, 12))),
        st.text(_hex, min_size=64, max_size=64),
        st.builds(
            lambda path, q, v: f"https://example.com/{path}?{q}={v}&page=2",
            st.text(string.ascii_lowercase + "/", min_size=1, max_size=20),
            st.sampled_from(["q", "utm_source", "sort", "id", "ref", "v"]),
            st.text(string.ascii_letters + string.digits, max_size=20),
        ),
    ),
    st.sampled_from(["commit {}", "{}", "see {} now", "`{}`", "id={}"]),
)
def test_shas_uuids_hashes_and_urls_stay(value: str, template: str) -> None:
    text = template.format(value)
    assert Redactor().redact(text) == (text, {})


@PROPS
@given(st.text(max_size=300))
def test_never_crashes_and_is_idempotent_on_any_text(text: str) -> None:
    redactor = Redactor()
    once, _ = redactor.redact(text)
    assert redactor.redact(once) == (once, {})


@PROPS
@given(st.lists(st.sampled_from(SECRET_CORPUS_KINDS), min_size=1, max_size=4), _seeds)
def test_redacting_secrets_is_idempotent(kinds: list[str], seed: int) -> None:
    rng = random.Random(seed)
    text = "\n".join(
        embed(rng, GENERATORS[k](rng)[0], rng.choice(["sentence", "code", "reply"])) for k in kinds
    )
    once, counts = Redactor().redact(text)
    assert sum(counts.values()) >= 1
    assert Redactor().redact(once) == (once, {})


# ---- the pieces ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "strength"),
    [
        ("DB_PASSWORD", STRONG),
        ("PGPASSWD", STRONG),
        ("client_secret", STRONG),
        ("SECRET_KEY_BASE", STRONG),
        ("GITHUB_TOKEN", TOKENISH),
        ("x-api-key", TOKENISH),
        ("apiKey", TOKENISH),
        ("tokenizer", 0),
        ("max_tokens", 0),
        ("password_hash", 0),
        ("sort_key", 0),
        ("token_type", 0),
        ("space_secrets", 0),
    ],
)
def test_key_strength(key: str, strength: int) -> None:
    assert key_strength(key) == strength


def test_rules_have_lowercase_anchors_and_known_kinds() -> None:
    finder = SecretFinder()
    assert finder.rules == RULES
    with pytest.raises(ValueError, match="not lowercase"):
        SecretFinder((Rule("bad", ("AKIA",), lambda text: []),))
    text = "\n".join(GENERATORS[k](random.Random(0))[0] for k in SECRET_CORPUS_KINDS)
    assert {span.kind for span in finder.find(text)} <= set(SECRET_KINDS)


def test_overlapping_finds_merge_into_one_span_of_the_specific_kind() -> None:
    out, counts = Redactor().redact(
        "token=xoxb-1234567890-0987654321-AbCdEfGh and Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
    )
    assert out == f"token={SECRET} and Authorization: Bearer {SECRET}"
    assert counts == {"slack_token": 1, "jwt": 1}


def test_a_value_repeated_elsewhere_goes_everywhere() -> None:
    out, counts = Redactor().redact("api_token = 'q8Wz3xLp0rTn5vYb' | 'q8Wz3xLp0rTn5vYb'")
    assert "q8Wz3xLp0rTn5vYb" not in out and counts == {"password": 2}
