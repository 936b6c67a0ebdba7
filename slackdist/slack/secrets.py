"""Where the secrets are in a text: spans with a kind, found in layers, cheaply on text that holds none.

Layers, in order of priority (where spans overlap, the first layer's kind wins):

1. Known token formats from `detect-secrets` (Yelp): its plugins' format regexes for AWS key ids, Azure
   storage keys, GitHub, GitLab, npm, legacy OpenAI, PyPI, SendGrid, Slack, Stripe, Twilio, Discord, Mailchimp,
   Square and Telegram tokens.
2. Current formats the library lacks (``_FORMATS``), each with the scanner rule it follows (gitleaks'
   ``config/gitleaks.toml``, MIT): newer GitHub/GitLab/Slack/OpenAI forms, Anthropic, Hugging Face, GCP, Azure,
   Stripe, npm, JWTs (signed or not), private key blocks and about fifty other services' prefixed tokens.
3. Context rules no format covers: keyword assignments with any prefix or suffix (``DB_PASSWORD=``,
   ``*_API_KEY:``, ``.env`` lines, YAML/JSON keys, XML elements, ``--password x``), URL userinfo for every scheme,
   ``Authorization`` headers and bare ``Bearer``/``Basic`` credentials, ``curl -u``, meeting passcodes, Kubernetes
   ``Secret`` data, and an unlabelled AWS secret key next to an AWS key id.

Only the value is marked, and only a literal one: a quoted string or a token-shaped run, never a code expression
(``password = getpass.getpass()``, ``token = os.environ["X"]``, ``api_key=None``, ``token=token``). A value found
once is marked wherever else it occurs in the text.

Speed: ``SecretFinder.find`` runs on every message of an export. Each rule names lowercase anchors (substrings one
of which every match contains); one Aho-Corasick pass over the text's lowered ASCII bytes (``ahocorasick-rs``) tells which rules
can match, and only those run. Ordinary chat costs a ``lower()``, that pass and two ``in`` tests.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import ahocorasick_rs
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

PLACEHOLDER = "[REDACTED_SECRET]"

# Every kind a span can have; report.json counts redactions under these names (documented in the README).
SECRET_KINDS = (
    "private_key",
    "slack_token",
    "github_token",
    "gitlab_token",
    "aws_key",
    "gcp_key",
    "azure_key",
    "openai_key",
    "anthropic_key",
    "huggingface_token",
    "stripe_key",
    "twilio_key",
    "sendgrid_key",
    "npm_token",
    "pypi_token",
    "jwt",
    "other_token",
    "bearer",
    "basic_auth",
    "url_password",
    "meeting_passcode",
    "password",
)


@dataclass(frozen=True)
class Span:
    """A secret's place in a text: ``text[start:end]`` is replaced by one placeholder."""

    start: int
    end: int
    kind: str


Finder = Callable[[str], list[tuple[int, int, str]]]


@dataclass(frozen=True)
class Rule:
    """One detector: ``find`` runs on a text only when its lowered form contains one of ``anchors``.

    Attributes:
        name: what it finds (for messages and the README).
        anchors: lowercase substrings, one of which every match contains (empty: ``gate`` decides).
        find: returns (start, end, kind) of each secret value in the text.
        gate: for a rule without anchors, a cheap necessary condition on the text (None: always run).
    """

    name: str
    anchors: tuple[str, ...]
    find: Finder
    gate: Callable[[str], bool] | None = None


def _regex(kind: str, pattern: str | re.Pattern, group: int | str = 0) -> Finder:
    """A finder over one regex: the span of ``group`` of each match."""
    rx = re.compile(pattern, re.DOTALL) if isinstance(pattern, str) else pattern

    def find(text: str) -> list[tuple[int, int, str]]:
        if rx.search(text) is None:  # the common case, without building a list
            return []
        return [
            (*m.span(group), kind)
            for m in rx.finditer(text)
            if m.start(group) < m.end(group) and len(set(m.group(group))) > 4  # not a mask: ACxxxxxxxx…
        ]

    return find


def _library(
    kind: str, plugin: type, group: int = 0, only: tuple[int, ...] | None = None, bounded: bool = False
) -> Finder:
    """A finder over a detect-secrets plugin's own format regexes (its ``denylist``).

    Args:
        kind: the kind of what it finds.
        plugin: a ``RegexBasedDetector`` subclass.
        group: the regex group that holds the value (0: the whole match).
        only: indexes of the denylist regexes to use (None: all).
        bounded: drop matches glued to more letters or digits (the plugin's regex has no boundaries, and
            ``ACCA…`` inside a DNA string or ``AC…`` inside a base64 blob is not a key).
    """
    finders = [
        _regex(kind, rx, group if rx.groups else 0)
        for i, rx in enumerate(plugin.denylist)
        if only is None or i in only
    ]

    def find(text: str) -> list[tuple[int, int, str]]:
        found = []
        for f in finders:
            found += f(text)
        if bounded:
            found = [
                (s, e, k)
                for s, e, k in found
                if not (s > 0 and text[s - 1].isalnum()) and not (e < len(text) and text[e].isalnum())
            ]
        return found

    return find


# ---------------------------------------------------------------- value checks


def _mixed(value: str) -> bool:
    """Upper and lower case letters and a digit or ``/``/``+``: a base64 key, never a hex digest or a word."""
    return (
        any(c.isupper() for c in value)
        and any(c.islower() for c in value)
        and any(c.isdigit() or c in "/+" for c in value)
    )


def _basic_credentials(value: str) -> bool:
    """A Basic auth value: base64 of ``user:password``."""
    try:
        return b":" in base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
    except (binascii.Error, ValueError):
        return False


# ---------------------------------------------------------------- layer 1: detect-secrets plugins

_LIBRARY_RULES = (
    Rule(
        "AWS key id",
        ("akia", "asia", "abia", "acca", "a3t"),
        _library("aws_key", AWSKeyDetector, only=(0,), bounded=True),
    ),
    Rule("quoted AWS secret key", ("aws",), _library("aws_key", AWSKeyDetector, group=1, only=(1,))),
    Rule("Azure storage key", ("accountkey=",), _library("azure_key", AzureStorageKeyDetector)),
    Rule(
        "GitHub token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
        _library("github_token", GitHubTokenDetector),
    ),
    Rule(
        "GitLab token",
        (
            "glpat-",
            "gldt-",
            "glft-",
            "glsoat-",
            "glrt-",
            "gr1348941",
            "glcbt-",
            "glimt-",
            "glptt-",
            "glagent-",
            "gloas-",
        ),
        _library("gitlab_token", GitLabTokenDetector),
    ),
    Rule("npm token in .npmrc", ("_authtoken",), _library("npm_token", NpmDetector, group=1)),
    Rule("OpenAI key (T3BlbkFJ)", ("t3blbkfj",), _library("openai_key", OpenAIDetector)),
    Rule("PyPI token", ("pypi-age",), _library("pypi_token", PypiTokenDetector)),
    Rule("SendGrid key", ("sg.",), _library("sendgrid_key", SendGridDetector)),
    Rule("Slack token or webhook", ("xox", "hooks.slack.com"), _library("slack_token", SlackDetector)),
    Rule("Stripe live key", ("k_live_",), _library("stripe_key", StripeDetector)),
    # No lowercase literal is common to these; their gates are case-sensitive substring tests.
    Rule(
        "Twilio SID",
        (),
        _library("twilio_key", TwilioKeyDetector, bounded=True),
        lambda t: "AC" in t or "SK" in t,
    ),
    Rule(
        "Discord bot token",
        (),
        _library("other_token", DiscordBotTokenDetector, bounded=True),
        lambda t: len(t) >= 59 and ("M" in t or "N" in t or "O" in t) and t.count(".") >= 2,
    ),
    Rule(
        "Mailchimp key",
        tuple(f"-us{d}" for d in range(10)),
        _library("other_token", MailchimpDetector, bounded=True),
    ),
    Rule("Square OAuth secret", ("sq0csp-",), _library("other_token", SquareOAuthDetector)),
    Rule("Telegram bot token", (":a",), _library("other_token", TelegramBotTokenDetector, bounded=True)),
)

# ---------------------------------------------------------------- layer 2: formats the library lacks

_END = r"(?![A-Za-z0-9_-])"  # a token ends where token characters end

# (kind, anchors, regex). Sources: gitleaks config/gitleaks.toml (MIT) unless a comment says otherwise.
_FORMATS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # A BEGIN line up to its END line (also JSON-escaped, as in a GCP service-account file); an unterminated
    # block (a truncated paste) runs to the next fence or the end.
    (
        "private_key",
        ("private key",),
        r"-----BEGIN[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:.*?-----END[ A-Z0-9_-]{0,100}PRIVATE KEY(?: BLOCK)?-----"
        # unterminated: only when a body follows (a quoted header alone is a mention, not a key)
        r"|(?=(?:\s|\\n|[\w-]+: [^\n]*\n)*[A-Za-z0-9+/=]{16})(?:(?!```).)*)",
    ),
    (
        "private_key",
        ("putty-user-key-file",),
        r"PuTTY-User-Key-File-\d:(?:.*?Private-MAC: *[0-9a-fA-F]+|(?:(?!```).)*)",
    ),
    # Slack: every xox?- type (xoxc- client tokens, xoxd- cookies with %-escapes, xoxe.xoxp- config tokens),
    # app-level tokens, and webhooks with http://, https:// or no scheme.
    ("slack_token", ("xox",), r"\bxox[a-z](?:\.xox[a-z])?-(?=[A-Za-z0-9%-]*\d)[A-Za-z0-9%-]{3,}"),
    ("slack_token", ("xapp-",), r"\bxapp-\d-[A-Za-z0-9-]{10,}"),
    (
        "slack_token",
        ("hooks.slack.com",),
        r"(?:https?://)?hooks\.slack\.com/(?:services|workflows|triggers)/\w+/[\w/+-]+",
    ),
    (
        "github_token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        rf"\bgh[pousr]_[A-Za-z0-9]{{20,255}}{_END}|\bgithub_pat_\w{{20,255}}",
    ),
    (
        "gitlab_token",
        (
            "glpat-",
            "gldt-",
            "glft-",
            "glsoat-",
            "glrt-",
            "glcbt-",
            "glimt-",
            "glptt-",
            "glagent-",
            "gloas-",
            "glffct-",
            "gr1348941",
        ),
        r"\b(?:glpat|gldt|glft|glsoat|glrt|glcbt|glimt|glptt|glagent|gloas|glffct)-[\w.-]{20,}|\bGR1348941[\w-]{20,}",
    ),
    # AWS ids the library does not list (IAM user/role/group/policy ids leak account structure).
    (
        "aws_key",
        ("agpa", "aida", "aroa", "anpa", "anva", "aipa"),
        r"\b(?:AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b",
    ),
    ("anthropic_key", ("sk-ant-",), rf"\bsk-ant-[a-z]{{2,8}}\d\d-[\w-]{{20,}}{_END}"),
    # OpenAI project/service-account/admin keys, and the plain sk- + 32..200 forms (OpenAI-compatible APIs).
    (
        "openai_key",
        ("sk-",),
        rf"\bsk-(?:(?:proj|svcacct|admin|None)-[\w-]{{20,}}|[A-Za-z0-9]{{32,200}}){_END}",
    ),
    ("huggingface_token", ("hf_", "api_org_"), rf"\b(?:hf|api_org)_[A-Za-z0-9]{{30,}}{_END}"),
    ("gcp_key", ("aiza",), rf"\bAIza[\w-]{{35}}{_END}"),
    (
        "gcp_key",
        ("gocspx-",),
        rf"\bGOCSPX-[\w-]{{24,}}{_END}",
    ),  # OAuth client secret (Google's documented prefix)
    (
        "gcp_key",
        ("ya29.",),
        rf"\bya29\.[\w-]{{20,}}{_END}",
    ),  # OAuth access token (Google's documented prefix)
    (
        "azure_key",
        ("accountkey=", "sharedaccesskey=", "sharedaccesssignature="),
        r"(?i)\b(?:AccountKey|SharedAccessKey|SharedAccessSignature)=([A-Za-z0-9+/=%]{20,})",
    ),
    ("azure_key", ("sig=",), r"[?&;]sig=([A-Za-z0-9%+/=]{20,})"),  # a SAS token's signature
    ("azure_key", ("q~",), r"(?<![\w~.-])[\w~.]{3}\dQ~[\w~.-]{31,34}(?![\w~.-])"),  # Entra ID client secret
    (
        "stripe_key",
        ("k_live_", "k_test_", "k_prod_"),
        rf"\b[rs]k_(?:live|test|prod)_[A-Za-z0-9]{{10,247}}{_END}",
    ),
    ("stripe_key", ("whsec_",), rf"\bwhsec_[A-Za-z0-9+/=]{{24,}}{_END}"),
    ("sendgrid_key", ("sg.",), rf"\bSG\.[\w-]{{16,32}}\.[\w-]{{16,64}}{_END}"),
    ("npm_token", ("npm_",), rf"\bnpm_[A-Za-z0-9]{{36}}{_END}"),
    ("pypi_token", ("pypi-age",), r"\bpypi-AgE[\w-]{50,}"),
    # A JWT (signed, or unsigned with an empty third part); detect-secrets' regex would leave the signature.
    ("jwt", ("eyj",), r"\beyJ[\w-]{8,}={0,2}\.[\w-]{8,}={0,2}\.(?:[\w-]+={0,2})?"),
    # Other services' prefixed tokens (all gitleaks rules of that form).
    (
        "other_token",
        (
            "ops_eyj",
            "age-secret-key-1",
            "p8e-",
            "ltai",
            "akcp",
            "cmvmd",
            "absk",
            "4b1d",
            "clojars_",
            "v1.0-",
            "dapi",
            "_v1_",
            "dp.",
            "duffel_",
            "dt0c01.",
            "ezak",
            "eztk",
            "eaa",
            "flwseck",
            "flwpubk",
            "fo1_",
            "fm1",
            "fm2_",
            "fio-u-",
            "glc_",
            "glsa_",
            "eyjrijoi",
            "atlasv1",
            "hrku-",
            "ico-",
            "s-s4t2",
            "lin_api_",
            "_mmk",
            "ntn_",
            "api-",
            "sha256~",
            "pplx-",
            "pscale_",
            "pmak-",
            "pnu_",
            "pul-",
            "rdme_",
            "rubygems_",
            "tk-us-",
            "xkeysib-",
            "sntry",
            "sm_",
            "shippo_",
            "shp",
            "sq0atp-",
            "hvs.",
            "hvb.",
            "sgp_",
            "squ_",
            "sqp_",
            "sqa_",
            "nrak-",
            "nrii-",
            "nrjs-",
            "atatt3",
            "dnkey-",
            "_gitlab_session=",
            "aaaaaaaaaaaaaaaaaaaaa",
            "doo_",
            "atbb",
            "lsv2_",
            "pat.",
            "sat.",
            "cio",
            "odt_",
            "tvly-",
            "nraa-",
            "nriq-",
            "nral",
            "key-",
            "k.eyj",
        ),
        r"\bops_eyJ[\w+/]{250,}={0,3}|\bAGE-SECRET-KEY-1[0-9A-Z]{58}|\bp8e-[A-Za-z0-9]{32}"
        r"|\bLTAI[A-Za-z0-9]{20}\b|\bAKCp[A-Za-z0-9]{69}\b|\bcmVmd[A-Za-z0-9]{59}\b|\bABSK[A-Za-z0-9+/]{109,269}={0,2}"
        r"|\b4b1d[A-Za-z0-9]{38}\b|\bCLOJARS_[A-Za-z0-9]{60}|\bv1\.0-[a-f0-9]{24}-[a-f0-9]{146}|\bdapi[a-f0-9]{32}(?:-\d)?\b"
        r"|\bdo[opr]_v1_[a-f0-9]{64}|\bdp\.(?:pt|st|ct|sa|scim|audit)\.(?:[\w-]{1,40}\.)?[A-Za-z0-9]{40,44}|\bduffel_(?:test|live)_[\w=-]{43}"
        r"|\bdt0c01\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{64}|\bEZ[AT]K[A-Za-z0-9]{54}\b|\bEAA[MC][A-Za-z0-9]{100,}"
        r"|\bFLW(?:SECK|PUBK)_TEST-[a-hA-H0-9]{12,32}(?:-X)?|\bfo1_[\w-]{43}|\bfm1[ar]_[\w+/]{100,}={0,3}"
        r"|\bfm2_[\w+/]{100,}={0,3}|\bfio-u-[\w=-]{64}|\bglc_[A-Za-z0-9+/]{32,400}={0,3}|\bglsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}"
        r"|\beyJrIjoi[A-Za-z0-9]{70,400}={0,3}|\b[a-z0-9]{14}\.atlasv1\.[\w=-]{60,70}|\bHRKU-AA[\w-]{58}"
        r"|\bico-[A-Za-z0-9]{32}\b|\bs-s4t2(?:ud|af)-[a-f0-9]{64}|\blin_api_[A-Za-z0-9]{40}|\b[A-Za-z0-9]{6}_[A-Za-z0-9]{29}_mmk"
        r"|\bntn_\d{11}[A-Za-z0-9]{35}|\bAPI-[A-Z0-9]{26}\b|\bsha256~[\w-]{43}|\bpplx-[A-Za-z0-9]{48}"
        r"|\bpscale_(?:tkn|oauth|pw)_[\w=.-]{32,64}|\bPMAK-[a-fA-F0-9]{24}-[a-fA-F0-9]{34}|\bpnu_[A-Za-z0-9]{36}"
        r"|\bpul-[a-f0-9]{40}|\brdme_[a-z0-9]{70}|\brubygems_[a-f0-9]{48}|\btk-us-[\w-]{48}"
        r"|\bxkeysib-[a-f0-9]{64}-[A-Za-z0-9]{16}|\bsntrys_eyJ[A-Za-z0-9+/=_]{50,}|\bsntryu_[a-f0-9]{64}"
        r"|\bsm_(?:aat|pat|sat)_[A-Za-z0-9]{16}|\bshippo_(?:live|test)_[a-fA-F0-9]{40}|\bshp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}"
        r"|\b(?:EAAA|sq0atp-)[\w-]{22,60}|\bhv[sb]\.[\w-]{90,300}|\bsgp_(?:[a-fA-F0-9]{16}_|local_)?[a-fA-F0-9]{40}"
        r"|\bsq[upa]_[a-f0-9]{40}|\bNR(?:AK|II|JS|AA|IQ)-[A-Za-z0-9_-]{19,32}|\b[a-f0-9]{36}NRAL\b|\bATATT3[\w=-]{150,}|\bdnkey-[\w=-]{26}-[\w=-]{52}"
        r"|_gitlab_session=[0-9a-z]{32}|\bA{22}[A-Za-z0-9%]{80,120}"
        r"|\b(?:pat|sat)\.[\w-]{22}\.[A-Za-z0-9]{24}\.[A-Za-z0-9]{20}"
        r"|\bATBB[A-Za-z0-9_=.-]{24,}|\blsv2_(?:pt|sk)_[a-f0-9]{32}_[a-f0-9]{10}"  # (trufflehog: Bitbucket, LangSmith)
        # (Nosey Parker: crates.io, Dependency-Track, Tavily, Mailgun, Mapbox secret and public tokens)
        r"|\bcio[A-Za-z0-9]{32}\b|\bodt_[A-Za-z0-9]{32}\b|\btvly-[A-Za-z0-9]{32}\b|\bkey-[0-9a-f]{32}\b"
        r"|\b[ps]k\.eyJ[\w-]{20,}\.[\w-]{20,}",
    ),
    # Webhook URLs that are their own credential (Microsoft Teams, Discord); Slack's are above.
    ("other_token", ("webhook.office.com",), r"https://[\w.-]+\.webhook\.office\.com/webhookb2/[^\s\"'<>]+"),
    ("other_token", ("outlook.office",), r"https://outlook\.office(?:365)?\.com/webhook/[^\s\"'<>]+"),
    # Telegram bot tokens with a 34-character tail, which detect-secrets' regex (35) misses.
    ("other_token", (":a",), r"\b\d{5,16}:A[\w-]{33,34}(?![\w-])"),
    # Password hashes (crypt, bcrypt, sha-crypt, yescrypt, argon2) and Kerberos AS-REP/TGS hashes: crackable offline.
    (
        "other_token",
        ("$1$", "$2a$", "$2b$", "$2y$", "$5$", "$6$", "$7$", "$8$", "$y$", "$argon2", "$krb5"),
        r"\$(?:1|2[aby]|5|6|7|8|y|argon2(?:id|i|d)|krb5asrep|krb5tgs)\$[^\s'\"`]{16,}",
    ),
    # A base64-encoded PEM private key (``LS0tLS1CRUdJTi`` is ``-----BEGIN``).
    ("private_key", ("ls0tls1crudjti",), r"\bLS0tLS1CRUdJTi[A-Za-z0-9+/=]{20,}"),
    (
        "other_token",
        ("/api/webhooks/",),
        r"(?:https?://)?(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[\w-]+",
    ),
)


_FORMAT_RULES = tuple(Rule(kind, anchors, _regex(kind, pattern)) for kind, anchors, pattern in _FORMATS)


# ---------------------------------------------------------------- layer 3: context rules
#
# Keyword assignments. A key is an identifier-ish run holding a secret word; the value after its operator is
# marked only when it is a literal. Strength decides how secret-shaped a literal must be.

STRONG, TOKENISH = 2, 1

# Words (after splitting a key on _ - . and camelCase) and what a value under them must look like.
_STRONG_WORDS = frozenset(
    "password passwd passwort passphrase passcode pass pwd pswd secret contrasena contraseña motdepasse".split()
)
_TOKEN_WORDS = frozenset("token apikey credential credentials creds key auth pat".split())
# A key ending in one of these names something about a secret, not the secret (``token_type``, ``password_hash``).
_NOT_VALUE_TAILS = frozenset(
    "id ids name names type types len length size count file files path dir url uri endpoint field fields header "
    "headers env var prefix suffix format algorithm algo policy version expires expiry expiration ttl timeout hint "
    "label placeholder help message msg pattern regex class mode param params attr column index idx limit char chars "
    "hash hashed salt rounds min max required enabled disabled strength reset confirm confirmation changed change "
    "provider providers store manager service source sources location ref refs kind scope scopes usage uses used "
    "method methods handler callback getter setter tokenizer tokenizers spec schema validator error errors list "
    "map dict set cache key_name input output filter filters text template rule rules policy policies".split()
)
# Multi-word keys whose last part is ``key`` but that are not secrets.
_KEY_FALSE = frozenset(
    "primary foreign sort cache partition hash dict lookup map group join unique composite natural row api_version "
    "shortcut hot keyboard press release default public pub secondary index range".split()
)
# A name's pieces: acronyms, (Capitalised) lowercase words, digit runs (``DB_PASSWORD``, ``apiKey``, ``Ec2Subnet``).
_SEGMENT_RE = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_KEYWORD_RE = re.compile(r"pass|pwd|pswd|secret|token|key|auth|cred|contrase|motdepasse", re.IGNORECASE)
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.$")
# After a key: an optional closing quote/bracket, an optional type word (``var apiToken string = "…"``), an
# assignment operator (gitleaks' set, plus ``.=``), then the value.
_ASSIGN_RE = re.compile(
    r"(?P<close>[\"'`]?\]?[\"']?)"
    r"(?P<type>[ \t]+[A-Za-z_][\w.]*(?=[ \t]*(?::?=)))?"
    r"(?P<sp1>[ \t]*)(?P<op>:::=|::=|:=|\?=|\.=|=>|\|\||=(?![=~])|:(?![:/])|,|(?<=[ \t])-(?=[ \t]+[\"'`]))(?P<sp2>[ \t]*)"
)
_CLI_ASSIGN_RE = re.compile(r"(?P<sp>[ \t]+|=)")
_QUOTED_RE = re.compile(r"""[bB]?(?P<q>["'`])(?P<v>(?:(?!(?P=q))[^\n\\]|\\.)*)(?P=q)""")
# An unquoted value: up to whitespace, a quote, a bracket, ``,`` ``;`` or a JSON-escaped newline; ``&`` goes on
# unless a new ``name=`` follows it (a URL query's next parameter).
_BARE_RE = re.compile(r"""(?:[^\s"'`<>(){}\[\],;\\&]|&(?![\w.-]+=))+""")
_IDENT_CHAIN_RE = re.compile(r"[A-Za-z_$][\w$]*(?:(?:\.|->|::)[A-Za-z_$][\w$]*)*")
_STOP_VALUES = frozenset(
    "none null nil true false undefined yes no on off str string int integer bool boolean bytes float number "
    "object any dict list optional secretstr self this cls void required optional empty default unset na n/a tbd "
    "todo xxx redacted masked hidden secret password passwd token key value changeme placeholder example dummy "
    "sample foo bar baz test testing your_password yourpassword your_token your_api_key mypassword mysecret "
    "env auto prompt ask stdin pwd user username admin".split()
)
_TEMPLATE_RE = re.compile(
    r"\$\{|\{\{|\{[\w.]*\}|<[^>]*>|%\(|%[sd]\b|^\$[A-Za-z_{(]|^%\w+%$|^\*+$|^\.\.\.|^x{3,}$", re.IGNORECASE
)


def _key_words(key: str) -> list[str]:
    return [w.lower() for w in _SEGMENT_RE.findall(key)]


def key_strength(key: str) -> int:
    """How sure a key names a secret: ``STRONG`` (any literal), ``TOKENISH`` (token-shaped literals), or 0.

    ``DB_PASSWORD``, ``PGPASSWD``, ``client_secret`` are strong; ``GITHUB_TOKEN``, ``x-api-key``, ``apiKey``
    are tokenish; ``tokenizer``, ``max_tokens``, ``password_hash``, ``sort_key``, ``token_type`` are not keys
    of secrets.
    """
    words = [w for w in _key_words(key) if not w.isdigit()]
    if not words:
        return 0
    tail = words[-1]
    if tail in _NOT_VALUE_TAILS or (
        len(words) > 1 and words[-2] in ("key", "token") and tail in ("name", "id")
    ):
        return 0
    low = key.lower()
    if tail in _STRONG_WORDS or "passw" in tail or tail.endswith(("secret", "passwd", "pwd")):
        return STRONG
    if any(w in _STRONG_WORDS for w in words[-3:]) and tail in (
        "value",
        "data",
        "str",
        "text",
        "b64",
        "base",
        "plain",
    ):
        return STRONG
    if tail == "key":
        if any(w in _STRONG_WORDS for w in words[:-1]):
            return STRONG  # SECRET_KEY, PASSWORD_KEY
        if len(words) == 1 or words[-2] not in _KEY_FALSE:
            return TOKENISH
        return 0
    if tail in _TOKEN_WORDS or tail.endswith(("token", "apikey", "secretkey", "accesskey")):
        return TOKENISH
    if "apikey" in low.replace("_", "").replace("-", "") and tail not in _NOT_VALUE_TAILS:
        return TOKENISH
    return 0


_CONSONANT_RUN_RE = re.compile(r"[bcdfghjklmnpqrstvwxz]{5}")


def _wordlike(part: str) -> bool:
    """A word, an acronym, or words in camelCase/PascalCase (``RSAKey``, ``challengePassword``, ``Ec2SubnetIds``).

    Random letters split into camelCase too; they fail on a one-letter lowercase piece, a piece of two or more
    letters without a vowel (short acronyms like ``Rpc``, ``httpx`` aside), five consonants in a row, or more
    than one run of digits inside (``nTiEvHITrbvDCTugmtrt``, ``WLCO3GIZN6QD2OO9``).
    """
    segments = _SEGMENT_RE.findall(part)
    if not segments or "".join(segments) != part:
        return False
    if segments[-1].isdigit() and len(segments) > 1 and len(segments[-1]) <= 2:
        segments = segments[:-1]
    if sum(seg.isdigit() for seg in segments) > 1:
        return False
    if sum(len(seg) <= 2 and not seg.isdigit() for seg in segments) > 2:
        return False  # QhcKkawFI3UIj0: names have few one- and two-letter pieces
    for i, seg in enumerate(segments):
        low = seg.lower()
        if seg.isdigit():
            glued = (
                i > 0
                and len(segments[i - 1]) >= 2
                and (i + 1 == len(segments) or segments[i + 1][0].isupper())
            )
            if not glued:
                return False  # Ec2Subnet, PKCS7Private, ed25519 are names; T0ken is a password
            continue
        vowel = any(v in low for v in "aeiouy")
        if seg.isupper():
            if len(seg) >= 5 and not vowel:
                return False
            continue
        if len(seg) < 2 or _CONSONANT_RUN_RE.search(low):
            return False
        if not vowel and not (
            (i == 0 and seg.islower() and len(seg) <= 5) or (seg[0].isupper() and len(seg) == 3)
        ):
            return False
    return True


_SHORT_HEX_RE = re.compile(r"[0-9a-f]{1,19}|[0-9A-F]{1,19}")
_TOKEN_CHARS_RE = re.compile(r"[!-~]+")  # printable ASCII, no space
_COLOUR_RE = re.compile(r"#[0-9a-fA-F]{3,8}")
_CODE_CHARS_RE = re.compile(r"[&<>(){}\\\"'`,;#]")  # code or markup around, not one token
_DOTTED_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*){2,}")


def _token_shaped(value: str) -> bool:
    """A value that looks like a generated credential, not a word, a name, a constant or a short hash.

    ``aio_VxEqGaqgMgZej3Dcee``, ``WLCO3GIZN6QD2OO9``, ``sk_live_fake_9f8e7d6c5b4a`` are; ``X-Xet-Access-Token``,
    ``serverlessrepo:applicationId``, ``CVSS2_VECTOR``, ``RSAKey``, ``48205d4ffd7feba3`` are not.
    """
    if len(value) < 6 or not _TOKEN_CHARS_RE.fullmatch(value) or not any(c.isalpha() for c in value):
        return False
    if _COLOUR_RE.fullmatch(value) or _CODE_CHARS_RE.search(value):
        return False
    parts = [p for p in re.split(r"[-_.:/]+", value) if p]
    if all(len(p) <= 4 or _wordlike(p) or p.isdigit() for p in parts) or _SHORT_HEX_RE.fullmatch(value):
        return False  # words, CamelCase, CONSTANT_CASE, paths and versions; short hex ids and hashes
    if _DOTTED_NAME_RE.fullmatch(value):
        return False  # com.github.googlei18n.cu2qu.curve_type
    if any(c.isdigit() for c in value):
        return True
    return len(value) >= 20 and any(c.isupper() for c in value) and any(c.islower() for c in value)


def is_placeholder(value: str) -> bool:
    """An empty, masked, templated or example value, or one of our own placeholders."""
    v = value.strip()
    if len(v) < 3 or v.startswith("[") or re.match(r"\$[A-Za-z_{(]", v):
        return True
    low = v.lower()
    if low in _STOP_VALUES or low.rstrip("0123456789!") in _STOP_VALUES or len(set(v)) <= 2:
        return True  # password1, secret123, changeme!
    return _TEMPLATE_RE.search(v) is not None


@dataclass
class _Assignment:
    key: str
    start: int  # the value's span
    end: int
    quoted: bool
    op: str
    env_style: bool  # a tight ``KEY=value`` outside a call
    rest_of_line: bool
    key_quoted: bool = False  # "key": … (JSON, a dict): a bare word after it is a variable
    followed_by: str = ""  # the first non-blank character after the value
    expression: bool = False


def _keyword_spans(text: str) -> Iterator[tuple[int, int, str]]:
    """Values of secret-named keys: ``KEY=v``, ``key: v``, ``"key": "v"``, ``key := "v"``, ``--key v``, …"""
    last_end = -1
    for m in _KEYWORD_RE.finditer(text):
        if m.start() < last_end:
            continue
        ks, ke = m.start(), m.end()
        while ks > 0 and text[ks - 1] in _KEY_CHARS:
            ks -= 1
        while ke < len(text) and text[ke] in _KEY_CHARS:
            ke += 1
        last_end = ke
        key = text[ks:ke].strip(".-$")
        namespaced = (
            ks >= 2 and text[ks - 1] == ":" and not text[ks - 2].isspace() and text[ks - 2] not in "({[,"
        )
        if not key or text.startswith(PLACEHOLDER, ks - 1) or namespaced:
            continue  # our own placeholder, or a namespaced name (``AWS::ApiGateway::ApiKey``, ``arn:…:secret``)
        strength = key_strength(key)
        if not strength:
            continue
        found = _assignment(text, ks, ke, key)
        if found is None or found.expression:
            continue
        value = text[found.start : found.end]
        if _literal_secret(value, found, strength):
            yield found.start, found.end, _kind_of_key(key)
        elif found.quoted and value.count(" ") == 1:  # "X-Authorization pk_k64v…": a scheme, then the token
            head, tail = value.split(" ")
            if len(tail) >= 16 and _token_shaped(tail) and not _token_shaped(head):
                yield found.end - len(tail), found.end, _kind_of_key(key)


# A Kubernetes Secret manifest: every value under ``data:`` / ``stringData:`` is a secret (base64 or plain).
_K8S_SECRET_RE = re.compile(r"(?im)^[ \t]*kind:[ \t]*[\"']?secret[\"']?[ \t]*$")
_K8S_DATA_RE = re.compile(r"(?m)^([ \t]*)(?:data|stringData):[ \t]*\n((?:\1[ \t]+[^\n]*\n?)+)")
_K8S_ITEM_RE = re.compile(r"(?m)^[ \t]+[\w.-]+:[ \t]*[\"']?(?P<v>[^\s\"'#][^\n\"']*?)[\"']?[ \t]*$")


def _k8s_secret_spans(text: str) -> list[tuple[int, int, str]]:
    if _K8S_SECRET_RE.search(text) is None:
        return []
    found = []
    for block in _K8S_DATA_RE.finditer(text):
        for item in _K8S_ITEM_RE.finditer(text, block.start(2), block.end(2)):
            if not is_placeholder(item.group("v")):
                found.append((*item.span("v"), "password"))
    return found


def _assignment(text: str, ks: int, ke: int, key: str) -> _Assignment | None:
    """The value assigned to the key at ``text[ks:ke]``, or None when no value follows it."""
    key_quoted = ks > 0 and text[ks - 1] in "\"'`"
    if text.startswith("--", ks):
        a = _CLI_ASSIGN_RE.match(text, ke)
        if a is None:
            return None
        op, pos, tight = a.group("sp").strip() or " ", a.end(), False
    else:
        a = _ASSIGN_RE.match(text, ke)
        if a is None:
            return None
        op, pos = a.group("op"), a.end()
        tight = not (a.group("type") or a.group("sp1") or a.group("sp2"))
        if op == "," and not key_quoted:
            return None  # System.setProperty("FOO_TOKEN", "…"), getenv("api_token", "…")
        if key.lower() == "pass" and (op != "=" or a.group("type")):
            return None  # "First pass: …", "Pass x='y' to …" are prose; a bare ``pass`` key needs ``pass=``
    # ``KEY=value`` with nothing around ``=``, outside a call's arguments: a .env / shell / query line, where a
    # bare word is a value; in ``f(token=token)`` or ``password = DEFAULT`` it is a name.
    in_call = text[:ks].rstrip()[-1:] in ("(", ",")
    env_style = op == "=" and tight and not in_call
    q = _QUOTED_RE.match(text, pos)
    if q is not None:
        if q.group("q") == "`" and "${" in q.group("v"):
            return None
        start, end = q.span("v")
        return _Assignment(key, start, end, True, op, env_style, _rest_of_line(text, q.end()), key_quoted)
    if op in (",", "-") or not tight and a.re is _ASSIGN_RE and a.group("type"):
        return None
    b = _BARE_RE.match(text, pos)
    if b is None:
        return None
    start, end = b.span()
    while end > start and text[end - 1] in ".:!?" and (end == len(text) or text[end] in " \t\n"):
        if text[end - 1] == "!" and end - start > 8:
            break  # passwords end in ! often; a sentence rarely ends right after a value
        end -= 1
    if start == end:
        return None
    # ``name=value,`` is a keyword argument, ``name=value or other`` an expression
    env_style = env_style and text[end : end + 1] not in (",", ")") and not _PY_OPERATOR_RE.match(text, end)
    found = _Assignment(key, start, end, False, op, env_style, _rest_of_line(text, end), key_quoted)
    found.followed_by = text[end:].lstrip(" \t")[:1]
    value = text[start:end]
    if op == ":" and text[end:].lstrip(" \t")[:1] in (",", ")", "=", "|", "]") and _looks_like_type(value):
        found.expression = True  # an annotation: ``key: RSAKey, …``, ``token: str | None = None``
        return found
    chain = _IDENT_CHAIN_RE.match(text, start)
    if chain is not None:
        name = chain.group(0)
        called = text[chain.end() : chain.end() + 1] in ("(", "[", "{")
        parts = re.split(r"\.|->|::", name)
        attribute = (
            chain.end() >= end
            and not env_style  # ``PASSWORD=Abc.Def`` on a .env line is a value
            and len(parts) > 1
            and (len(parts) > 2 or not any(_token_shaped(p) for p in parts))  # vault's s.ZC9Ecf4M… is a token
        )
        found.expression = called or attribute
    return found


def _looks_like_type(value: str) -> bool:
    """``str``, ``RSAKey``, ``typing.Optional``: a name a value is annotated with.

    Not ``BlueLqwVKyEklg_55`` (``pass: BlueLqwVKyEklg_55, then restart``): a type name does not end in
    an underscore or in digits after one.
    """
    return value.lower() in _STOP_VALUES or (
        value[0].isupper()
        and re.fullmatch(r"[A-Za-z_][\w.]*", value) is not None
        and re.search(r"_\d*$", value) is None
        and not _token_shaped(value)
    )


_PY_OPERATOR_RE = re.compile(r"[ \t]+(?:or|and|if|else|is|in|not)[ \t]")


def _rest_of_line(text: str, end: int) -> bool:
    nl = text.find("\n", end)
    tail = text[end : len(text) if nl < 0 else nl].strip()
    return tail in ("", ";", ",", "\\", '"', "'") or tail.startswith(("#", "//"))


def _names_a_secret(value: str) -> bool:
    """A name that mentions a secret (``FORCE_CHANGE_PASSWORD``, ``challengePassword``, ``my-secret``)."""
    if any(c.isdigit() for c in value):
        return False  # summer-pass-2024 is a password
    parts = [p for p in re.split(r"[-_.:/]+", value) if p]
    if len(parts) < 2 and len(_SEGMENT_RE.findall(value)) < 2:
        return False  # one lowercase run (thisismypassword) is a value, not a name
    low = value.lower()
    return all(_wordlike(p) for p in parts) and any(w in low for w in ("pass", "secret", "token", "key"))


def _literal_secret(value: str, a: _Assignment, strength: int) -> bool:
    """Whether an assigned value is a literal secret (not a placeholder, template, word or expression)."""
    if is_placeholder(value):
        return False
    if a.op == ",":  # ("FOO_TOKEN", "…") is a call's arguments: only a long credential-shaped value is one
        return len(value) >= 16 and _token_shaped(value)
    if a.quoted:
        value = value.strip()
        if any(c.isspace() for c in value):
            return False
        if strength == STRONG:
            return len(value) >= 4 and not _names_a_secret(value)
        return _token_shaped(value)
    if value.isdigit():  # a PIN or a numeric key; a bare ``key=`` is as often a count or an index
        return len(value) >= (4 if strength == STRONG else 6) and a.key.lower() != "key"
    if not a.env_style and _names_a_secret(value):
        return False  # ``secret_key: secret_access_key``: a name, not the value (on a .env line, a value)
    identifier = re.fullmatch(r"[A-Za-z_]\w*", value) is not None
    if identifier and (a.key_quoted and a.op == ":" or a.followed_by in (",", ")")) and not a.env_style:
        if strength != STRONG or not any(c.isdigit() for c in value):
            return len(value) >= 16 and _token_shaped(value)  # ``"secret": client_secret,``, ``key=l1_key,``
    is_word = re.fullmatch(r"[A-Za-z_][A-Za-z_]*", value) is not None
    if is_word:
        if strength != STRONG:
            return _token_shaped(value)
        if a.env_style:
            return True
        if a.op == ":" and a.rest_of_line:
            return not (value[0].isupper() and any(c.isupper() for c in value[1:]))  # not a CamelCase type
        return False
    if strength == STRONG:
        return True
    return _token_shaped(
        value.split("&", 1)[0]
    )  # ``key=tok&more``: the whole value goes if its head is a token


_PROVIDER_KINDS = (
    ("aws", "aws_key"),
    ("secretaccesskey", "aws_key"),
    ("secret_access_key", "aws_key"),
    ("github", "github_token"),
    ("gitlab", "gitlab_token"),
    ("slack", "slack_token"),
    ("openai", "openai_key"),
    ("anthropic", "anthropic_key"),
    ("claude", "anthropic_key"),
    ("huggingface", "huggingface_token"),
    ("hf_", "huggingface_token"),
    ("gcp", "gcp_key"),
    ("google", "gcp_key"),
    ("azure", "azure_key"),
    ("stripe", "stripe_key"),
    ("twilio", "twilio_key"),
    ("sendgrid", "sendgrid_key"),
    ("npm", "npm_token"),
    ("pypi", "pypi_token"),
)


def _kind_of_key(key: str) -> str:
    low = key.lower()
    for name, kind in _PROVIDER_KINDS:
        if name in low:
            return kind
    return "password"


# XML elements and .NET/NuGet ``<add key="Password" value="…"/>`` entries.
_XML_RE = re.compile(
    r"<(?P<tag>[\w:.-]*(?:[Pp]ass(?:word|wd)?|PASSWORD|[Ss]ecret|SECRET|[Tt]oken|TOKEN|[Aa]pi[_-]?[Kk]ey|API_?KEY)[\w.-]*)>"
    r"\s*(?P<v>[^<\n]*[^<\s])\s*</(?P=tag)>"
    r"|<add\s+key=\"[^\"]*(?:[Pp]assword|[Ss]ecret|[Tt]oken|[Aa]pi[Kk]ey)[^\"]*\"\s+value=\"(?P<v2>[^\"]+)\""
    # ``<encryptionKey>…</encryptionKey>``: any *Key element whose name is a secret's, with a token-shaped value
    r"|<(?P<ktag>[\w:.-]+(?:Key|KEY|_key))>\s*(?P<v3>[^<\s]+)\s*</(?P=ktag)>"
)


def _xml_spans(text: str) -> Iterator[tuple[int, int, str]]:
    if "<" not in text:
        return
    for m in _XML_RE.finditer(text):
        if m.group("v3") is not None:
            if (
                key_strength(m.group("ktag"))
                and _token_shaped(m.group("v3"))
                and not is_placeholder(m.group("v3"))
            ):
                yield *m.span("v3"), "password"
            continue
        group = "v" if m.group("v") is not None else "v2"
        if key_strength(m.group("tag") or "password") and not is_placeholder(m.group(group)):
            yield *m.span(group), "password"


# Authorization headers (any scheme), then bare ``Bearer x`` / ``Basic x`` outside a header.
_AUTH_HEADER_RE = re.compile(
    r"(?i)\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?"
    r"(?:(?P<scheme>[A-Za-z][\w-]{1,20})[ \t]+)?"  # Bearer, Basic, token, Bot, Api-Token, SSWS, …
    r"(?P<v>[A-Za-z0-9._~+/:=|-]{8,})"
)
# The token must look like one (a digit or token punctuation, or long): "Bearer authentication" stays.
_BEARER_RE = re.compile(
    r"(?i)\bbearer(?:\s+|:\s*)(?P<v>(?=[A-Za-z0-9._~+/-]*(?:[0-9]|[._~+/-][A-Za-z0-9]))[A-Za-z0-9._~+/-]{8,}=*|[A-Za-z]{24,})"
)
_AUTH_SCHEMES = frozenset(
    "bearer basic token bot digest apikey api-key api-token sso-key splunk dsn key ssws".split()
)
_BASIC_RE = re.compile(r"(?i)\bbasic\s+(?P<v>[A-Za-z0-9+/]{8,}={0,2})")


def _auth_spans(text: str) -> Iterator[tuple[int, int, str]]:
    for m in _AUTH_HEADER_RE.finditer(text):
        value = m.group("v")
        known = (m.group("scheme") or "").lower() in _AUTH_SCHEMES
        if is_placeholder(value) or not (known or (len(value) >= 16 and _token_shaped(value))):
            continue
        kind = "basic_auth" if (m.group("scheme") or "").lower() == "basic" else "bearer"
        yield *m.span("v"), kind
    for m in _BEARER_RE.finditer(text):
        if not is_placeholder(m.group("v")):
            yield *m.span("v"), "bearer"
    for m in _BASIC_RE.finditer(text):
        if _basic_credentials(m.group("v")):
            yield *m.span("v"), "basic_auth"


# ``curl -u user:pass``, ``--user user:pass``, ``mysql -pSECRET``, ``docker login -p SECRET``.
_CLI_USER_RE = re.compile(
    r"(?:^|\s)(?:-u|--user|--proxy-user)(?:[ \t]+|=)(?P<q>[\"']?)(?P<u>[^\s\"':]*):(?P<v>[^\s\"']*)(?P=q)"
)
_CLI_PASSWORD_RE = re.compile(
    r"\b(?:mysql|mysqldump|mysqladmin|mariadb)\b[^\n]*?\s-p(?P<v>[^\s\"'-][^\s\"']*)"
    r"|\b(?:docker|podman|helm(?: registry)?|oras|nerdctl|buildah)\s+login\b[^\n]*?\s(?:-p|--password)(?:[ \t]+|=)(?P<w>[^\s\"'-][^\s\"']*)"
)


def _cli_spans(text: str) -> Iterator[tuple[int, int, str]]:
    for m in _CLI_USER_RE.finditer(text):
        if m.group("v"):
            if (
                not is_placeholder(m.group("v")) and not m.group("v").isdigit()
            ):  # docker -u 1000:1000 is uid:gid
                yield *m.span("v"), "basic_auth"
        elif len(m.group("u")) >= 8 and not is_placeholder(
            m.group("u")
        ):  # curl -u "sk_test_…:": the key is the user
            yield *m.span("u"), "basic_auth"
    for m in _CLI_PASSWORD_RE.finditer(text):
        group = "v" if m.group("v") is not None else "w"
        if not is_placeholder(m.group(group)):
            yield *m.span(group), "password"


# ``scheme://user:password@host`` for every scheme (postgres, mongodb+srv, redis, amqp, https, ftp, …).
# A password may hold an unescaped ``#`` (pasted by hand); the ``@`` and a host after it make it userinfo.
_URL_USERINFO_RE = re.compile(
    r"\b[A-Za-z][A-Za-z0-9+.-]{1,30}://[^\s:/?#@\"'<>]*:(?P<v>[^\s/?@\"'<>]+)@(?=[\w\[])"
)


def _url_spans(text: str) -> Iterator[tuple[int, int, str]]:
    scheme = text.find("://")
    if scheme < 0 or text.find("@", scheme) < 0:
        return  # userinfo needs an @ after the scheme (a mention before it is not one)
    for m in _URL_USERINFO_RE.finditer(text, max(0, scheme - 32)):
        if not is_placeholder(m.group("v")):
            yield *m.span("v"), "url_password"


# Meeting passcodes: ``?pwd=…`` in Zoom links, ``Passcode: 123456``, ``Meeting password: abc123``.
_MEETING_WORDS = ("meeting", "zoom", "webex", "teams", "bridge", "conference", "dial-in")
_MEETING_RE = re.compile(
    r"[?&](?:pwd|passcode|pw)=(?P<v>[\w.~-]{4,})"
    rf"|(?i:\bpass ?code|\b(?:{'|'.join(_MEETING_WORDS)}) (?:password|pwd|pin|key|code))"
    r"(?:\s*(?:is|:|=|-|#)\s*|\s+)(?P<w>(?=[\w@#$%^&*!.-]*\d)[\w@#$%^&*!.-]{4,}(?:\s\d{3,})?)"
)


def _meeting_spans(text: str) -> Iterator[tuple[int, int, str]]:
    for m in _MEETING_RE.finditer(text):
        group = "v" if m.group("v") is not None else "w"
        yield *m.span(group), "meeting_passcode"


# An unlabelled 40-character AWS secret access key, looked for only in texts that hold an AWS key id.
_AWS_SECRET_RE = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def _aws_secret_spans(text: str) -> Iterator[tuple[int, int, str]]:
    for m in _AWS_SECRET_RE.finditer(text):
        if _mixed(m.group(0)):
            yield *m.span(), "aws_key"


# ---------------------------------------------------------------- the detector


def _keyword_and_xml_spans(text: str) -> list[tuple[int, int, str]]:
    return [*_keyword_spans(text), *_xml_spans(text)]


_CONTEXT_RULES = (
    Rule("URL userinfo", ("://",), lambda text: list(_url_spans(text))),
    Rule(
        "meeting passcode",
        ("pwd=", "pw=", "passcode", "pass code")
        + tuple(f"{m} {w}" for m in _MEETING_WORDS for w in ("password", "pwd", "pin", "key", "code")),
        lambda text: list(_meeting_spans(text)),
    ),
    Rule(
        "Authorization header, Bearer, Basic",
        ("bearer", "basic", "authorization"),
        lambda text: list(_auth_spans(text)),
    ),
    Rule(
        "curl -u, mysql -p, docker login -p",
        (" -u", "--user", "--proxy-user", "mysql", "mariadb", " login"),
        lambda text: list(_cli_spans(text)),
    ),
    Rule("Kubernetes Secret data", ("kind:",), _k8s_secret_spans),
    Rule(
        "keyword assignment",
        ("pass", "pwd", "pswd", "secret", "token", "key", "auth", "cred", "contrase", "motdepasse"),
        _keyword_and_xml_spans,
    ),
)
FORMAT_RULES = _LIBRARY_RULES + _FORMAT_RULES
RULES = FORMAT_RULES + _CONTEXT_RULES


@functools.cache
def _dispatch(
    rules: tuple[Rule, ...],
) -> tuple[ahocorasick_rs.BytesAhoCorasick, tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """An Aho-Corasick automaton over every anchor, the rules each anchor wakes, and the rules that always run.

    One pass of the automaton over the lowered text tells which of ~150 anchors occur: cheaper than one ``in``
    test per anchor, and far cheaper than an alternation regex (Python's ``re`` tries every branch at every
    position).

    Raises:
        ValueError: an anchor is not lowercase (it could never match the lowered text).
    """
    wakes: dict[str, list[int]] = {}
    for i, rule in enumerate(rules):
        for anchor in rule.anchors:
            if anchor != anchor.lower() or not anchor.isascii():
                raise ValueError(f"anchor {anchor!r} of rule {rule.name!r} is not lowercase ASCII")
            wakes.setdefault(anchor, []).append(i)
    anchors = list(wakes)
    automaton = ahocorasick_rs.BytesAhoCorasick([a.encode("ascii") for a in anchors])
    always = tuple(i for i, rule in enumerate(rules) if not rule.anchors)
    return automaton, tuple(tuple(wakes[a]) for a in anchors), always


def ascii_lower_bytes(text: str) -> bytes:
    """The text's ASCII characters, lowercased, as bytes: what the anchors are looked for in.

    Anchors are ASCII, so dropping the rest loses none (it may join two neighbours into a false anchor, which only
    wakes a rule for nothing); bytes keep the automaton off UTF-8 re-encoding, 2-3x cheaper on non-English chat.
    """
    return text.encode("ascii", "ignore").lower()


class SecretFinder:
    """All layers: ``find(text)`` returns the spans of every secret, merged and in order.

    Args:
        rules: the detectors, in priority order (default: library formats, our formats, context rules).
    """

    def __init__(self, rules: tuple[Rule, ...] = RULES) -> None:
        self.rules = rules
        self._automaton, self._wakes, always = _dispatch(rules)
        self._gated = tuple((i, rules[i].gate) for i in always)

    def find(self, text: str, ascii_lower: bytes | None = None) -> list[Span]:
        """The secrets in ``text``, as non-overlapping spans sorted by start.

        Where spans of two rules overlap they merge into one, with the kind of the rule listed first (a
        specific format beats a keyword rule: ``token=xoxb-…`` is a ``slack_token``).

        Args:
            text: the text to search.
            ascii_lower: ``ascii_lower(text)`` when the caller has it already.
        """
        haystack = ascii_lower if ascii_lower is not None else ascii_lower_bytes(text)
        woken = {i for i, gate in self._gated if gate is None or gate(text)}
        for anchor, _, _ in self._automaton.find_matches_as_indexes(haystack, overlapping=True):
            woken.update(self._wakes[anchor])
        if not woken:
            return []
        found: list[tuple[int, int, int, str]] = []  # (start, end, priority, kind)
        for priority in sorted(woken):
            for start, end, kind in self.rules[priority].find(text):
                found.append((start, end, priority, kind))
        if not found:
            return []
        if any(f[3] == "aws_key" for f in found):  # an unlabelled secret key travels with its key id
            found += [(s, e, len(self.rules), k) for s, e, k in _aws_secret_spans(text)]
        spans = _merge(found)
        return _merge(found + _repeats(text, spans)) if len(spans) < len(text) else spans


def _repeats(text: str, spans: list[Span]) -> list[tuple[int, int, int, str]]:
    """Other places the same value occurs (``'k' | 'k'``, a key quoted again in a reply): a secret anywhere."""
    more = []
    for span in spans:
        value = text[span.start : span.end]
        if len(value) < 8:
            continue
        pos = text.find(value)
        while pos >= 0:
            if pos != span.start:
                more.append((pos, pos + len(value), 1 << 30, span.kind))
            pos = text.find(value, pos + 1)
    return more


def _merge(found: list[tuple[int, int, int, str]]) -> list[Span]:
    """Overlapping spans become one, with the kind of the highest-priority (lowest number) span among them."""
    if not found:
        return []
    found.sort()
    spans: list[Span] = []
    start, end, prio, kind = found[0]
    for s, e, p, k in found[1:]:
        if s < end:
            if e > end:
                end = e
            if p < prio:
                prio, kind = p, k
        else:
            spans.append(Span(start, end, kind))
            start, end, prio, kind = s, e, p, k
    spans.append(Span(start, end, kind))
    return spans
