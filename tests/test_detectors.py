"""PII/secret detectors: every kind found next to look-alikes that must survive."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from llmctl import detectors as d

# (kind, text containing exactly one match, the matched text)
POSITIVES = [
    ("email", "write to john.doe@example.com today", "john.doe@example.com"),
    ("email", "cc: a.b+tag@sub.domain.co.uk,", "a.b+tag@sub.domain.co.uk"),
    ("email", "Author: Jane <jane_roe@uni-sb.de>", "jane_roe@uni-sb.de"),
    ("email", "mailto:first.last@company.io.", "first.last@company.io"),
    ("phone", "call +44 20 7946 0958 now", "+44 20 7946 0958"),
    ("phone", "tel +49 30 901820", "+49 30 901820"),
    ("phone", "Paris: +33 1 42 68 53 00.", "+33 1 42 68 53 00"),
    ("phone", "office (415) 555-0123 ext", "(415) 555-0123"),
    ("phone", "cell 212-555-0199", "212-555-0199"),
    ("phone", "fax 202.456.1111", "202.456.1111"),
    ("phone", "whatsapp +31641044153", "+31641044153"),
    ("phone", "+1-202-456-1111 (main)", "+1-202-456-1111"),
    ("ip", "client 203.0.113.45 connected", "203.0.113.45"),
    ("ip", "host=192.168.1.20;", "192.168.1.20"),
    ("ip", "gateway 10.0.0.254", "10.0.0.254"),
    ("ip", "from 24.201.139.93:8080", "24.201.139.93"),
    ("ip", "addr 2001:db8:85a3::8a2e:370:7334 up", "2001:db8:85a3::8a2e:370:7334"),
    ("ip", "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("credit_card", "visa 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("credit_card", "card=4012888888881881", "4012888888881881"),
    ("credit_card", "mc 5555-5555-5555-4444", "5555-5555-5555-4444"),
    ("credit_card", "mc2 2223003122003222", "2223003122003222"),
    ("credit_card", "amex 3782 822463 10005", "3782 822463 10005"),
    ("credit_card", "discover 6011000990139424;", "6011000990139424"),
    ("credit_card", "jcb 3530111333300000", "3530111333300000"),
    ("credit_card", "diners 30569309025904", "30569309025904"),
    ("secret", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "token ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8" + " end", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("secret", "glpat-Ab3dE6gH9jK2mN5pQ8sT", "glpat-Ab3dE6gH9jK2mN5pQ8sT"),
    ("secret", "SLACK=xoxb-1234567890-abcdefghijklmn", "xoxb-1234567890-abcdefghijklmn"),
    ("secret", "stripe.api_key = sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("secret", "key=AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
    ("secret", "OPENAI_API_KEY=sk-proj-" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv1Wx2Yz3Ab4Cd5", "sk-proj-Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv1Wx2Yz3Ab4Cd5"),
    ("secret", "HF_TOKEN=hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"),
    ("secret", "npm_" + "a1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8", "npm_a1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"),
    ("secret", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("secret", "DATABASE_URL=postgres://admin:S3cr3tP4ssw0rd@db.internal:5432/app", "S3cr3tP4ssw0rd"),
    ("secret", 'API_KEY = "a8f5f167f44f4964e6c998dee827110c"', "a8f5f167f44f4964e6c998dee827110c"),
    ("secret", "{'client_secret': 'Zx9Qw8Er7Ty6Ui5Op4As3Df2'}", "Zx9Qw8Er7Ty6Ui5Op4As3Df2"),
    ("secret", 'db_password: "h7Gk2pLq9XzR4vWm"', "h7Gk2pLq9XzR4vWm"),
    # .env files, shell profiles, ~/.aws/credentials: unquoted and quoted
    ("secret", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1"),
    ("secret", "[default]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1\n", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Ls2Vd1"),
    ("secret", "export DB_PASSWORD=hunter2secret", "hunter2secret"),
    ("secret", "export DB_PASSWORD='p@ss w0rd!'", "p@ss w0rd!"),
    ("secret", 'POSTGRES_PASSWORD="Tr0ub4dor&3"  # prod', "Tr0ub4dor&3"),
    ("secret", "GITHUB_TOKEN=4f9a1c2b3d4e5f60718293a4b5c6d7e8f9012345", "4f9a1c2b3d4e5f60718293a4b5c6d7e8f9012345"),
    ("secret", "SECRET_KEY=django-insecure-7x9k2m4p6q8r0t1v3w5y", "django-insecure-7x9k2m4p6q8r0t1v3w5y"),
    ("secret", "set ADMIN_PASSWORD=Winter2024!", "Winter2024!"),
    ("secret", "aws_session_token = IQoJb3JpZ2luX2VjEJr/wEaCXVzLWVhc3QtMSJHMEUCIQD", "IQoJb3JpZ2luX2VjEJr/wEaCXVzLWVhc3QtMSJHMEUCIQD"),
]

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
    "aFDrBz9vFqU4yQ3nqzv9dGxGj7Zb2F1o8vXcLrVt2yN8nHkzP1mZt6q3zQ==\n"
    "-----END RSA PRIVATE KEY-----"
)
OPENSSH_TRUNCATED = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\nAAAAMwAAAAtzc2gtZWQ"

NEGATIVES = [
    # emails
    "requires python@2.7 or newer", "pip install pkg@1.2.3", "@property\ndef f(self): ...",
    "ssh user@localhost", "npm i @types/node@18.0.1", "h = x@self.weight.T + b", "y = a@b.T",
    "git+https://github.com/org/repo.git@v1.0.2#egg=x", "foo@bar", "email = user + '@' + domain",
    "git clone git@github.com:org/repo.git", "remote = 'deploy@git.example.com:apps/site.git'",
    # phones
    "a = +4294967296  # 1 << 32", "format(1234, '+b') == '+10011010010'", "x = 4155550123",
    "555-123-4567", "on 2023-01-15 at 12:30:45", "id 1700000000000", "range(100000, 999999)",
    "isbn 978-3-16-148410-0", "ts=+000000120",
    # ips / versions
    "version 1.2.3.4", "numpy==1.26.4.1", "v10.0.19041.1", "Windows 10.0.19041.1288",
    "release 2.7.2.2", '__version__ = "10.0.0.1"', '"version": "192.168.10.1"', "127.0.0.1:8000", "0.0.0.0", "netmask 255.255.255.0", "oid 1.3.6.1.4.1.311",
    "0.0.0.31", "std::vector<int> v;", "a[::2]", "x[1::3]", "datetime 2024-01-02T03:04:05Z",
    "::1", "fe80::1%eth0", "224.0.0.251", "see sections \"8.2.4.44 Bogus comment\"", "1.0.0.127.in-addr.arpa",
    # cards
    "4111 1111 1111 1112", "1234567890123456", "uuid 123e4567-e89b-12d3-a456-426614174000",
    "0000 0000 0000 0000", "4444444444444444", "order 4111-11111-1111-111",
    "sha e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "1.4111111111111111", "x = 3.141592653589793238",
    # secrets
    'password = "changeme"', 'token = os.environ["TOKEN"]', 'api_key = "YOUR_API_KEY_HERE_12345"',
    'SECRET_KEY = get_random_secret_key()', "from huggingface_hub import hf_hub_download",
    "pip install scikit-learn sk-learn", "ghp_short", "https://user@host.org/x",
    "https://docs.python.org:443/3/library/", 'key = "some.module.attribute_name"',
    'key="param:secp384r1.pem"', 'cache_key = "aaaaaaaaaaaaaaaaaaaa"', "AKIA_NOT_A_KEY",
    "http://user:password@example.com", "sk-ant-short", "eyJhbGciOiJIUzI1NiJ9 alone",
    # env-style assignments that hold no secret: empty, placeholders, expansions, files, URLs, code
    "PASSWORD=", "PASSWORD=''", "PASSWORD=<your-password>", "DB_PASSWORD=${DB_PASSWORD}", "export DB_PASSWORD=$DB_PASSWORD",
    "DB_PASSWORD=$(cat /run/secrets/db)", "DB_PASSWORD_FILE=/run/secrets/db_password", "the password is required",
    "Set PASSWORD= to your password.", "password = getpass.getpass()", "password = hunter2", "PASSWORD=changeme",
    "API_KEY=your_api_key_here", "SORT_KEY=created_at", "CACHE_KEY=user_profile_v2", "MAX_TOKENS=4096",
    "TOKEN_URL=https://auth.example.com/token", "PWD=/home/user", "password: Optional[str] = None", "    password=password,",
    "SSH_KEY_PATH=~/.ssh/id_rsa", "KEY=1 ./run.sh", "password: ${DB_PASSWORD}", "PASSWORD=********", "PASSWORD_MIN_LENGTH=12",
    "secret_key_base = Rails.application.credentials.secret", 'export TOKEN="$(gh auth token)"', "api_key=settings.API_KEY",
    # private keys
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----",
    "-----BEGIN CERTIFICATE-----\nMIIDXTCCAkWgAwIBAgIJAJC1HiIAZAiIMA0GCSqGSIb3DQEBCwUA\n-----END CERTIFICATE-----",
    'if "PRIVATE KEY" in pem: ...',
]


@pytest.mark.parametrize("kind,text,expected", POSITIVES, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVES)])
def test_each_positive_is_found_with_its_kind_and_span(kind, text, expected):
    found = d.find(text)
    assert [(m.kind, m.text) for m in found] == [(kind, expected)]
    m = found[0]
    assert text[m.start : m.end] == expected


def test_every_kind_has_positives():
    # Recall is pinned item by item above (every positive found, with its span); this keeps a
    # new detector kind from landing without any.
    assert {k for k, _, _ in POSITIVES} | {"private_key"} == set(d.KINDS)


@pytest.mark.parametrize("text", NEGATIVES)
def test_look_alikes_survive(text):
    assert d.find(text) == []
    assert d.redact(text) == (text, {})


def test_private_key_blocks_with_and_without_end_line():
    text = f"config:\n{PEM}\nrest of file"
    [m] = d.find(text)
    assert (m.kind, m.text) == ("private_key", PEM)
    [m] = d.find("x\n" + OPENSSH_TRUNCATED + "\n\nnext paragraph")
    assert m.kind == "private_key" and m.text == OPENSSH_TRUNCATED


def test_redact_typed_placeholders_counts_and_custom_format():
    text = "mail bob@corp.com or call +44 20 7946 0958; card 4111 1111 1111 1111 from 203.0.113.9"
    out, counts = d.redact(text)
    assert out == "mail <EMAIL> or call <PHONE>; card <CREDIT_CARD> from <IP>"
    assert counts == {"email": 1, "phone": 1, "credit_card": 1, "ip": 1}
    out, counts = d.redact(text, kinds=["email"], placeholder_fmt="[{kind}]")
    assert out.startswith("mail [email] or call +44") and counts == {"email": 1}
    assert d.count(text + " bob@corp.com") == {"email": 2, "phone": 1, "credit_card": 1, "ip": 1}


def test_overlaps_resolve_to_the_higher_priority_kind():
    # the password inside a URL is a secret, not the start of an email
    text = "https://svc:Pq7Lx9Wz2Rt5@mail.example.com/"
    assert [(m.kind, m.text) for m in d.find(text)] == [("secret", "Pq7Lx9Wz2Rt5")]
    out, _ = d.redact(text)
    assert out == "https://svc:<SECRET>@mail.example.com/"


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown detector kind.*'mail'.*valid: email"):
        d.find("x", kinds=["mail"])
    assert d.find("bob@corp.com", kinds="email")[0].kind == "email"


def test_non_ascii_text_keeps_offsets():
    text = "Zoë – naïve café ✓ call (415) 555-0123 or zoë@exämple.com bob@corp.com"
    found = d.find(text)
    assert [(m.kind, text[m.start : m.end]) for m in found] == [("phone", "(415) 555-0123"), ("email", "bob@corp.com")]


def test_benign_code_has_almost_no_hits():
    """The stdlib's own modules (not its tests, which plant PII on purpose): <= 2% of files
    with any hit other than the authors' e-mail addresses, which are real PII."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:150] + sorted(root.glob("[a-m]*/*.py"))[:150]
    files = [p for p in files if "test" not in p.parts]
    assert len(files) >= 100
    flagged = []
    for p in files:
        kinds = {m.kind for m in d.find(p.read_text(encoding="utf-8", errors="replace"))} - {"email"}
        if kinds:
            flagged.append((p.name, kinds))
    assert len(flagged) / len(files) <= 0.02, flagged
