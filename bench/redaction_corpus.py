"""A synthetic corpus for the redaction bench: real-format secrets in Slack-like text, and lookalikes.

Every secret is generated from its provider's documented format (prefix, alphabet, length), with a fresh random
body, so no real credential is in this file and nothing here is copied from a scanner's test data. Each
example is embedded in one of five settings a Slack export holds: a sentence, a code block, a link, an
attachment-like text (a bot's alert) and a thread reply.

    from bench.redaction_corpus import secret_examples, lookalike_examples
    for ex in secret_examples(seed=0, per_kind=40): ...
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import phonenumbers

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"
UPPER_B32 = string.ascii_uppercase + "234567"
SETTINGS = ("sentence", "code", "link", "attachment", "reply")


@dataclass(frozen=True)
class Example:
    """One text and what must (secrets) or must not (lookalikes) disappear from it.

    Attributes:
        kind: the corpus kind (a secret kind from the README's table, or a lookalike family).
        text: the message text, as it reaches the redactor (entities decoded).
        values: substrings that must not survive redaction (empty for lookalikes).
        setting: sentence, code, link, attachment or reply.
    """

    kind: str
    text: str
    values: tuple[str, ...]
    setting: str


def rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def password(rng: random.Random) -> str:
    """A human-chosen-looking password: letters, digits and a symbol or two, 10-20 characters."""
    words = ["Summer", "Rocket", "Tiger", "Falcon", "Maple", "Orion", "Quartz", "Blue", "Nimbus", "Kappa"]
    body = rng.choice(words) + rand(rng, ALNUM, rng.randint(4, 10)) + rand(rng, "!#%*-_", rng.randint(1, 2))
    return body + rand(rng, string.digits, 2)


def b64(rng: random.Random, nbytes: int) -> str:
    return base64.b64encode(rng.randbytes(nbytes)).decode()


def b64url_json(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode().rstrip("=")


# ---------------------------------------------------------------- one generator per kind
# Each returns (snippet, values): the text that holds the secret in its usual surface form, and the parts of it
# that must disappear. Code-like snippets go into code blocks as they are.


def gen_password(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    """Keyword assignments with any prefix/suffix: .env, export, YAML, JSON, code, docker-compose."""
    pw = password(rng)
    key = rng.choice(
        [
            "DB_PASSWORD",
            "POSTGRES_PASSWORD",
            "MYSQL_ROOT_PASSWORD",
            "REDIS_PASSWORD",
            "PGPASSWORD",
            "PGPASSWD",
            "SMTP_PASS",
            "ADMIN_PASSWORD",
            "RABBITMQ_DEFAULT_PASS",
            "APP_SECRET",
            "JWT_SECRET",
            "SESSION_SECRET",
            "SECRET_KEY",
            "DJANGO_SECRET_KEY",
            "SECRET_KEY_BASE",
            "CLIENT_SECRET",
            "OAUTH_CLIENT_SECRET",
            "WEBHOOK_SECRET",
            "ENCRYPTION_KEY",
            "API_KEY",
            "MAPS_API_KEY",
            "DATADOG_API_KEY",
            "SENTRY_AUTH_TOKEN",
            "VAULT_TOKEN",
            "CI_DEPLOY_TOKEN",
            "ACCESS_TOKEN",
            "REFRESH_TOKEN",
            "KEYSTORE_PASSWORD",
            "LDAP_BIND_PASSWORD",
        ]
    )
    if "TOKEN" in key or "API_KEY" in key or key == "ENCRYPTION_KEY":
        pw = rand(rng, ALNUM, rng.choice([24, 32, 40]))
    lower = key.lower()
    camel = lower.split("_")[0] + "".join(w.title() for w in lower.split("_")[1:])
    form = rng.choice(
        [
            f"{key}={pw}",
            f"export {key}={pw}",
            f'export {key}="{pw}"',
            f"{lower}: {pw}",
            f'{lower}: "{pw}"',
            f'{{"{lower}": "{pw}"}}',
            f'{lower} = "{pw}"',
            f'{camel} := "{pw}"',
            f"const {camel} = '{pw}';",
            f"  - {key}={pw}",
            f"{key.lower()}={pw}&{rand(rng, 'abcdefgh', 3)}",
            f"set {key}={pw}",
            f"<{camel}>{pw}</{camel}>",
            f"--{lower.replace('_', '-')} {pw}",
        ]
    )
    return form, (pw.split("&")[0],)


def gen_url_password(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    pw = password(rng).replace("#", "x")
    scheme = rng.choice(
        [
            "postgres",
            "postgresql",
            "mysql",
            "mongodb",
            "mongodb+srv",
            "redis",
            "rediss",
            "amqp",
            "amqps",
            "https",
            "http",
            "ftp",
            "sftp",
            "smtp",
            "ldap",
            "mssql",
            "sqlserver",
            "clickhouse",
            "nats",
            "kafka",
        ]
    )
    host = rng.choice(
        [
            "localhost",
            "127.0.0.1",
            f"10.0.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "db.internal",
            "cluster0.abcde.mongodb.net",
            "prod-db.example.com",
            "[::1]",
            "rabbit.svc.cluster.local",
        ]
    )
    port = rng.choice(["", ":5432", ":3306", ":6379", ":5672", ":27017"])
    user = rng.choice(["admin", "app", "deploy", "root", "svc_etl", ""])
    return f"{scheme}://{user}:{pw}@{host}{port}/{rng.choice(['app', 'prod', 'db0', ''])}", (pw,)


def gen_basic_auth(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    user, pw = rng.choice(["admin", "deploy", "ci-bot", "jane"]), password(rng)
    token = base64.b64encode(f"{user}:{pw}".encode()).decode()
    form = rng.choice(
        [
            (f"curl -u {user}:{pw} https://ci.example.com/api/json", (pw,)),
            (f'curl --user "{user}:{pw}" https://nexus.example.com/repository/', (pw,)),
            (f"curl -s -u '{user}:{pw}' -X POST https://api.example.com/v2/deploy", (pw,)),
            (f'curl -H "Authorization: Basic {token}" https://registry.example.com/v2/', (token,)),
            (f"Authorization: Basic {token}", (token,)),
            (f'headers = {{"Authorization": "Basic {token}"}}', (token,)),
        ]
    )
    return form


def gen_bearer(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rand(rng, ALNUM + "-._~", rng.randint(32, 64))
    tok = tok.strip("-._~") + rand(rng, ALNUM, 2)
    form = rng.choice(
        [
            f'curl -H "Authorization: Bearer {tok}" https://api.example.com/v1/me',
            f"Authorization: Bearer {tok}",
            f'headers = {{"Authorization": "Bearer {tok}"}}',
            f"fetch(url, {{ headers: {{ Authorization: 'Bearer {tok}' }} }})",
            f"authorization: bearer {tok}",
            f"use Bearer {tok} for the staging API",
            f"Authorization: token {tok}",
        ]
    )
    return form, (tok,)


def gen_connection_string(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    pw = password(rng).replace(";", "x")
    form = rng.choice(
        [
            f"Server=tcp:prod-sql.database.windows.net,1433;Initial Catalog=app;User ID=app;Password={pw};Encrypt=True;",
            f"Driver={{ODBC Driver 18 for SQL Server}};Server=10.1.2.3;Database=erp;UID=sa;PWD={pw};",
            f"Data Source=db01;Initial Catalog=Sales;User Id=report;Password={pw};",
            f"jdbc:postgresql://db.internal:5432/app?user=app&password={pw}&ssl=true",
            f"jdbc:mysql://10.0.0.5:3306/shop?user=root&password={pw}",
            f"Host=localhost;Port=5432;Database=app;Username=app;Password={pw}",
            f'DATABASE_URL="postgres://app:{pw}@db.internal:5432/app"',
            f"mongodb+srv://etl:{pw}@cluster0.x1y2z.mongodb.net/?retryWrites=true&w=majority",
            f"redis://:{pw}@cache.internal:6379/0",
        ]
    )
    return form, (pw,)


def gen_meeting_passcode(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    digits = rand(rng, string.digits, rng.choice([6, 8, 10]))
    pwd = rand(rng, B64URL, 32)
    code = rand(rng, ALNUM, 6) + rand(rng, string.digits, 1)
    meeting = rand(rng, string.digits, 11)
    form = rng.choice(
        [
            (f"https://us02web.zoom.us/j/{meeting}?pwd={pwd}", (pwd,)),
            (f"Join: https://zoom.us/j/{meeting}?pwd={pwd}.1", (pwd,)),
            (f"Meeting ID: {meeting[:3]} {meeting[3:7]} {meeting[7:]}\nPasscode: {digits}", (digits,)),
            (f"Passcode: {code}", (code,)),
            (f"passcode is {digits}", (digits,)),
            (f"Meeting password: {code}", (code,)),
            (f"Webex meeting password: {code}", (code,)),
            (f"Zoom pwd {digits}", (digits,)),
        ]
    )
    return form


def _labelled(rng: random.Random, label: str, value: str) -> str:
    """A token in one of its usual surface forms: bare, .env, code, JSON, YAML."""
    return rng.choice(
        [
            f"here's the key {value} (rotate after the demo)",
            f"{label}={value}",
            f'{label.lower()} = "{value}"',
            f'{{"{label.lower()}": "{value}"}}',
            f"{label}: {value}",
            value,
        ]
    )


def gen_github_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rng.choice(
        [
            rng.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + rand(rng, ALNUM, 36),
            "github_pat_11"
            + rand(rng, string.ascii_uppercase + string.digits, 20)
            + "_"
            + rand(rng, ALNUM, 59),
        ]
    )
    return _labelled(rng, "GITHUB_TOKEN", tok), (tok,)


def gen_gitlab_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rng.choice(
        [
            "glpat-" + rand(rng, B64URL, 20),
            "glpat-" + rand(rng, ALNUM, 27) + ".01." + rand(rng, "0123456789abcdefghijklmnopqrstuvwxyz", 9),
            "gldt-" + rand(rng, B64URL, 20),
            "glrt-" + rand(rng, B64URL, 20),
            "glptt-" + rand(rng, HEX, 40),
            "glft-" + rand(rng, B64URL, 20),
            "GR1348941" + rand(rng, B64URL, 20),
        ]
    )
    return _labelled(rng, "GITLAB_TOKEN", tok), (tok,)


def gen_huggingface_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rng.choice(["hf_", "api_org_"]) + rand(rng, string.ascii_letters, 34)
    return _labelled(rng, "HF_TOKEN", tok), (tok,)


def gen_openai_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rng.choice(
        [
            "sk-proj-" + rand(rng, B64URL, 74) + "T3BlbkFJ" + rand(rng, B64URL, 74),
            "sk-svcacct-" + rand(rng, B64URL, 58) + "T3BlbkFJ" + rand(rng, B64URL, 58),
            "sk-" + rand(rng, ALNUM, 20) + "T3BlbkFJ" + rand(rng, ALNUM, 20),
            "sk-proj-" + rand(rng, B64URL, 48),
            "sk-admin-" + rand(rng, B64URL, 58) + "T3BlbkFJ" + rand(rng, B64URL, 58),
        ]
    )
    return _labelled(rng, "OPENAI_API_KEY", tok), (tok,)


def gen_anthropic_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = "sk-ant-" + rng.choice(["api03", "admin01", "oat01"]) + "-" + rand(rng, B64URL, 93) + "AA"
    return _labelled(rng, "ANTHROPIC_API_KEY", tok), (tok,)


def gen_gcp_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = "AIza" + rand(rng, B64URL, 35)
    return _labelled(rng, "GOOGLE_API_KEY", tok), (tok,)


def _pem_body(rng: random.Random, nbytes: int) -> list[str]:
    body = b64(rng, nbytes)
    return [body[i : i + 64] for i in range(0, len(body), 64)]


def gen_gcp_service_account(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    lines = _pem_body(rng, rng.choice([600, 900, 1200]))
    key = "-----BEGIN PRIVATE KEY-----\\n" + "\\n".join(lines) + "\\n-----END PRIVATE KEY-----\\n"
    key_id = rand(rng, HEX, 40)
    doc = (
        '{\n  "type": "service_account",\n  "project_id": "acme-prod-123",\n'
        f'  "private_key_id": "{key_id}",\n  "private_key": "{key}",\n'
        '  "client_email": "deployer@acme-prod-123.iam.gserviceaccount.com",\n  "client_id": "1049'
        + rand(rng, string.digits, 17)
        + '"\n}'
    )
    return doc, (lines[0], lines[len(lines) // 2], lines[-1])


def gen_stripe_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = rng.choice(
        [
            "sk_live_" + rand(rng, ALNUM, 24),
            "sk_live_51" + rand(rng, ALNUM, 97),
            "rk_live_" + rand(rng, ALNUM, 24),
            "sk_test_" + rand(rng, ALNUM, 24),
            "rk_test_51" + rand(rng, ALNUM, 97),
            "whsec_" + rand(rng, ALNUM, 32),
        ]
    )
    return _labelled(rng, "STRIPE_SECRET_KEY", tok), (tok,)


def gen_twilio_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    form = rng.choice(
        [
            ("TWILIO_ACCOUNT_SID", "AC" + rand(rng, HEX, 32)),
            ("TWILIO_API_KEY", "SK" + rand(rng, HEX, 32)),
            ("TWILIO_AUTH_TOKEN", rand(rng, HEX, 32)),
            ("twilio_api_secret", rand(rng, ALNUM, 32)),
        ]
    )
    label, tok = form
    if tok.startswith(("AC", "SK")):
        return _labelled(rng, label, tok), (tok,)
    return rng.choice([f"{label}={tok}", f'{label.lower()} = "{tok}"', f"{label}: {tok}"]), (tok,)


def gen_sendgrid_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = "SG." + rand(rng, B64URL, 22) + "." + rand(rng, B64URL, 43)
    return _labelled(rng, "SENDGRID_API_KEY", tok), (tok,)


def gen_npm_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = "npm_" + rand(rng, ALNUM, 36)
    if rng.random() < 0.4:
        return f"//registry.npmjs.org/:_authToken={tok}", (tok,)
    return _labelled(rng, "NPM_TOKEN", tok), (tok,)


def gen_pypi_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    tok = "pypi-AgEIcHlwaS5vcmc" + rand(rng, B64URL, rng.randint(120, 180))
    if rng.random() < 0.3:
        return f"[pypi]\n  username = __token__\n  password = {tok}", (tok,)
    return _labelled(rng, "TWINE_PASSWORD", tok), (tok,)


def gen_azure_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    account_key, sas_key, openai_key = b64(rng, 64), b64(rng, 32), rand(rng, HEX, 32)
    sig = b64(rng, 32).replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    client_secret = rand(rng, ALNUM, 3) + rand(rng, string.digits, 1) + "Q~" + rand(rng, ALNUM + "_~.-", 34)
    return rng.choice(
        [
            (
                "DefaultEndpointsProtocol=https;AccountName=acmelogs;"
                f"AccountKey={account_key};EndpointSuffix=core.windows.net",
                (account_key,),
            ),
            (
                "https://acmelogs.blob.core.windows.net/exports?sv=2022-11-02&ss=b&srt=sco&sp=rl"
                f"&se=2026-12-31T00:00:00Z&sig={sig}",
                (sig,),
            ),
            (
                f"Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={sas_key}",
                (sas_key,),
            ),
            (f"AZURE_CLIENT_SECRET={client_secret}", (client_secret,)),
            (f"client secret is {client_secret}", (client_secret,)),
            (f"AZURE_OPENAI_API_KEY={openai_key}", (openai_key,)),
        ]
    )


def gen_aws_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    key_id = rng.choice(["AKIA", "ABIA", "ACCA", "ASIA", "A3T" + rng.choice(UPPER_B32)]) + rand(
        rng, UPPER_B32, 16
    )
    key_id = key_id[:20]
    secret = rand(rng, ALNUM + "/+", 40)
    while not (
        any(c.isupper() for c in secret)
        and any(c.islower() for c in secret)
        and any(c.isdigit() for c in secret)
    ):
        secret = rand(rng, ALNUM + "/+", 40)
    form = rng.choice(
        [
            (f"{key_id} / {secret}", (key_id, secret)),
            (f"access key {key_id}\nsecret {secret}", (key_id, secret)),
            (f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}", (key_id, secret)),
            (f"AWS_ACCESS_KEY_ID={key_id}\nAWS_SECRET_ACCESS_KEY={secret}", (key_id, secret)),
            (f'"AccessKeyId": "{key_id}", "SecretAccessKey": "{secret}"', (key_id, secret)),
            (f"key id {key_id}", (key_id,)),
        ]
    )
    return form


def gen_slack_token(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    num = lambda n: rand(rng, string.digits, n)  # noqa: E731
    cookie = "".join(
        rng.choice([c, "%2F", "%2B", "%3D"]) if rng.random() < 0.08 else c for c in rand(rng, ALNUM, 180)
    )
    tok = rng.choice(
        [
            f"xoxb-{num(12)}-{num(13)}-{rand(rng, ALNUM, 24)}",
            f"xoxp-{num(12)}-{num(12)}-{num(13)}-{rand(rng, HEX, 32)}",
            f"xoxc-{num(12)}-{num(12)}-{num(13)}-{rand(rng, HEX, 64)}",
            f"xoxd-{cookie}",
            f"xoxe.xoxp-1-{rand(rng, ALNUM, 160)}",
            f"xapp-1-A{rand(rng, UPPER_B32, 10)}-{num(13)}-{rand(rng, HEX, 64)}",
            f"https://hooks.slack.com/services/T{rand(rng, UPPER_B32, 8)}/B{rand(rng, UPPER_B32, 10)}/{rand(rng, ALNUM, 24)}",
            f"http://hooks.slack.com/services/T{rand(rng, UPPER_B32, 8)}/B{rand(rng, UPPER_B32, 10)}/{rand(rng, ALNUM, 24)}",
            f"hooks.slack.com/services/T{rand(rng, UPPER_B32, 8)}/B{rand(rng, UPPER_B32, 10)}/{rand(rng, ALNUM, 24)}",
            f"https://hooks.slack.com/workflows/T{rand(rng, UPPER_B32, 8)}/A{rand(rng, UPPER_B32, 10)}/{num(18)}/{rand(rng, ALNUM, 24)}",
        ]
    )
    return _labelled(rng, "SLACK_TOKEN", tok), (tok,)


def gen_jwt(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    claims = {
        "sub": rand(rng, string.digits, 8),
        "name": rng.choice(["svc", "jane", "etl"]),
        "iat": 1700000000 + rng.randint(0, 10**7),
    }
    if rng.random() < 0.4:
        tok = b64url_json({"alg": "none", "typ": "JWT"}) + "." + b64url_json(claims) + "."
        value = tok.rstrip(".")
    else:
        sig = base64.urlsafe_b64encode(rng.randbytes(32)).decode().rstrip("=")
        tok = (
            b64url_json({"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"})
            + "."
            + b64url_json(claims)
            + "."
            + sig
        )
        value = tok
    return _labelled(rng, "ID_TOKEN", tok), (value,)


def gen_private_key(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    label = rng.choice(
        [
            "RSA PRIVATE KEY",
            "PRIVATE KEY",
            "EC PRIVATE KEY",
            "OPENSSH PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
            "DSA PRIVATE KEY",
            "PGP PRIVATE KEY BLOCK",
        ]
    )
    lines = _pem_body(rng, rng.choice([120, 400, 1200]))
    block = f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----"
    return block, (lines[0], lines[-1])


def gen_email(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    first, last = (
        rng.choice(["ana", "li", "omar", "jane", "k"]),
        rng.choice(["garcia", "wei", "smith", "o-neil"]),
    )
    addr = (
        rng.choice([f"{first}.{last}", f"{first}{last}{rng.randint(1, 99)}", f"{first}+slack"])
        + "@"
        + rng.choice(["example.com", "acme.io", "mail.example.co.uk", "uni.example.edu"])
    )
    return rng.choice([f"mail me at {addr}", f"cc {addr}, thanks", f"<{addr}>", addr]), (addr,)


_PHONE_REGIONS = ("US", "US", "US", "GB", "DE", "FR", "ES", "IN", "BR", "JP", "AU", "CA", "MX", "NL", "IT")


def phone_number(rng: random.Random) -> str:
    """A valid number of a random region, in a layout people write (international, E.164, or US national)."""
    while True:
        region = rng.choice(_PHONE_REGIONS)
        example = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        example = example or phonenumbers.example_number(region)
        national = str(example.national_number)
        national = national[:-4] + rand(rng, string.digits, 4)
        number = phonenumbers.parse(f"+{example.country_code}{national}")
        if not phonenumbers.is_valid_number(number):
            continue
        if region == "US":
            fmt = rng.choice(["national", "plain", "dots", "intl"])
            if fmt == "national":
                return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
            if fmt == "plain":
                return national
            if fmt == "dots":
                return f"{national[:3]}.{national[3:6]}.{national[6:]}"
        fmt = rng.choice([phonenumbers.PhoneNumberFormat.INTERNATIONAL, phonenumbers.PhoneNumberFormat.E164])
        return phonenumbers.format_number(number, fmt)


def gen_phone(rng: random.Random) -> tuple[str, tuple[str, ...]]:
    number = phone_number(rng)
    return rng.choice([f"call me at {number}", f"my cell: {number}", f"{number} (on-call)", number]), (
        number,
    )


GENERATORS: dict[str, Callable[[random.Random], tuple[str, tuple[str, ...]]]] = {
    "password": gen_password,
    "url_password": gen_url_password,
    "basic_auth": gen_basic_auth,
    "bearer": gen_bearer,
    "connection_string": gen_connection_string,
    "meeting_passcode": gen_meeting_passcode,
    "github_token": gen_github_token,
    "gitlab_token": gen_gitlab_token,
    "huggingface_token": gen_huggingface_token,
    "openai_key": gen_openai_key,
    "anthropic_key": gen_anthropic_key,
    "gcp_key": gen_gcp_key,
    "gcp_service_account": gen_gcp_service_account,
    "stripe_key": gen_stripe_key,
    "twilio_key": gen_twilio_key,
    "sendgrid_key": gen_sendgrid_key,
    "npm_token": gen_npm_token,
    "pypi_token": gen_pypi_token,
    "azure_key": gen_azure_key,
    "aws_key": gen_aws_key,
    "slack_token": gen_slack_token,
    "jwt": gen_jwt,
    "private_key": gen_private_key,
    "email": gen_email,
    "phone": gen_phone,
}


def embed(rng: random.Random, snippet: str, setting: str) -> str:
    """Put a snippet where Slack text holds one: a sentence, a code block, a link, an alert, a thread reply."""
    if setting == "sentence":
        return rng.choice(
            [
                "hey, for the staging box: {s} — let me know",
                "fyi {s}",
                "{s}\nworks now",
                "ok so {s}, then restart",
            ]
        ).format(s=snippet)
    if setting == "code":
        return rng.choice(
            ["```\n{s}\n```", "try this:\n```\n# staging\n{s}\nmake deploy\n```", "`{s}`"]
        ).format(s=snippet)
    if setting == "link":
        return rng.choice(
            [
                "docs: https://wiki.example.com/ops/setup?tab=env#step-3 — {s}",
                "{s} (see https://github.com/acme/infra/pull/812)",
                "runbook https://runbooks.example.com/db (mirror at http://10.0.3.7:8080/runbook)\n{s}",
            ]
        ).format(s=snippet)
    if setting == "attachment":
        return rng.choice(
            [
                "*Deploy failed* · prod-eu\nEnvironment: production\n{s}\nTriggered by Jenkins #4512",
                "[alert] config drift detected\n> {s}\nSent from Grafana",
            ]
        ).format(s=snippet)
    return rng.choice(
        ["> can you paste the config?\n{s}", "replying in thread: {s}", "@Jane Doe {s} is what I used"]
    ).format(s=snippet)


def secret_examples(
    seed: int = 0, per_kind: int = 40, kinds: tuple[str, ...] | None = None
) -> Iterator[Example]:
    """``per_kind`` examples of every kind, cycling through the five settings."""
    rng = random.Random(seed)
    for kind in kinds or tuple(GENERATORS):
        for i in range(per_kind):
            snippet, values = GENERATORS[kind](rng)
            setting = SETTINGS[i % len(SETTINGS)]
            if setting == "code" and "\n" in snippet and "```" not in snippet:
                text = f"```\n{snippet}\n```"
            else:
                text = embed(rng, snippet, setting)
            yield Example(kind, text, tuple(v for v in values if v), setting)


# ---------------------------------------------------------------- lookalikes: nothing may change


def lookalike_examples(seed: int = 0, per_kind: int = 200) -> Iterator[Example]:
    """Git SHAs, UUIDs, hashes, base64 blobs, URLs with query strings and ordinary chat."""
    rng = random.Random(seed)
    makers: dict[str, Callable[[], str]] = {
        "git_sha": lambda: rng.choice(
            [
                "fixed in {h}",
                "cherry-pick {h} onto release",
                "`git revert {h}`",
                "commit {s} (short)",
                "see https://github.com/acme/api/commit/{h}",
            ]
        ).format(h=rand(rng, HEX, 40), s=rand(rng, HEX, rng.randint(7, 12))),
        "uuid": lambda: rng.choice(
            ["request id {u}", "tenant_id={u}", '{{"id": "{u}"}}', "trace {u} failed"]
        ).format(u="-".join(rand(rng, HEX, n) for n in (8, 4, 4, 4, 12))),
        "hash": lambda: rng.choice(
            [
                "sha256: {a}",
                "md5 {b}",
                "checksum={a}",
                "sha1sum: {c}  release.tar.gz",
                "digest sha256:{a}",
                'etag "{b}"',
            ]
        ).format(a=rand(rng, HEX, 64), b=rand(rng, HEX, 32), c=rand(rng, HEX, 40)),
        "base64": lambda: rng.choice(
            ["payload: {x}", "```\n{x}\n```", "data:image/png;base64,{x}", "the blob is {x}"]
        ).format(x=b64(rng, rng.randint(18, 150))),
        "url": lambda: rng.choice(
            [
                "https://www.google.com/search?q={w}+{w2}&hl=en&start=10",
                "https://example.com/items?page={n}&sort=desc&utm_source=slack&utm_medium=chat",
                "https://jira.example.com/browse/OPS-{n}?focusedCommentId={n}&page=com.atlassian",
                "https://docs.python.org/3/library/re.html#re.Pattern.search",
                "https://grafana.example.com/d/{h}/api?orgId=1&from=now-6h&to=now&var-env=prod",
                "https://github.com/acme/api/compare/{h}...main?expand=1",
                "https://www.youtube.com/watch?v={y}&t=42s",
                "http://localhost:8080/api/v1/users?id={n}&fields=name,email_verified",
                "https://s3.amazonaws.com/acme-public/reports/{n}.csv?versionId=null",
            ]
        ).format(
            w=rng.choice(["python", "slack", "rust"]),
            w2=rng.choice(["regex", "export"]),
            n=rng.randint(1, 99999),
            h=rand(rng, HEX, 12),
            y=rand(rng, B64URL, 11),
        ),
        "chat": lambda: rng.choice(
            [
                "deploy at 10:30 on 2024-03-02, v1.2.3 is out, ip 192.168.1.10 port 8080",
                "the token bucket refills every {n} ms; key point: we ship Friday",
                "I forgot my password again lol, resetting it now",
                "use Bearer authentication, the token is in vault",
                "primary key is (tenant_id, id); the secret sauce is caching",
                "set max_tokens=1024 and temperature=0.2",
                "ts 1712345678.000200 in #general, thread 1712345678.123456",
                "PR #{n} merged, closes OPS-{n}; build {n} green",
                "ports 8080 8081 8082 and 1234567890 in the list",
                "meeting moved to 3pm, room 4B, dial-in on the invite",
                "¡Hola! 確認しました شكراً Привет 👍 version 10.0.19041.1234",
                "it costs $1,234,567 per year — ISBN 978-3-16-148410-0",
                "the api key rotation is scheduled; auth: ok; passcode reset link sent by email",
                "git@github.com:acme/infra.git and @Ada Lovelace",
            ]
        ).format(n=rng.randint(1, 99999)),
    }
    for kind, make in makers.items():
        for i in range(per_kind):
            yield Example(kind, make(), (), SETTINGS[i % len(SETTINGS)])
