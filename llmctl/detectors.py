"""PII and secret detectors shared by `prepare` (data curation) and the safety rails.

API (stable):
  KINDS = ("email", "phone", "ip", "credit_card", "secret", "private_key")
  find(text, kinds=None) -> list[Match]     # Match(kind, start, end, text); sorted by start, non-overlapping
  redact(text, kinds=None, placeholder_fmt="<{KIND}>") -> (new_text, {kind: count})
  count(text, kinds=None) -> {kind: count}  # find() tallied; kinds=None means all KINDS
  An unknown kind raises ValueError naming the valid ones. No I/O, thread-safe; speed: bench/safety.py
  (`stdlib.mb_per_s` in bench/results.json).

Precision rules (each has a test in tests/test_detectors.py):
- email: local@domain.tld with an alphabetic TLD of 2+ letters, so `python@2.7`,
  `pkg@1.2.3`, `@decorator`, `user@localhost` are not emails; nor is `x@self.weight` (matmul)
  or the user part of a URL (`https://user@host`).
  Reserved example domains (example.com) are reported like any other.
- phone: international numbers written with a leading `+` (8-15 digits), and North-American
  numbers written with separators, `(415) 555-0123`, `415-555-0123`, `415.555.0123`, each
  confirmed by libphonenumber (`phonenumbers.is_valid_number`), so `+4294967296` is not one.
  Bare digit runs (ids, timestamps, counts) are never phones: too common in code.
- ip: IPv4 dotted quads (each octet 0-255, no leading zeros) and IPv6 addresses that
  `ipaddress` accepts. A dotted quad is a *version*, not an IP, when it follows `v`,
  `version`, `==`/`>=`/`<=`/`~=`/`!=`/`section`, is part of a longer dotted run (`1.2.3.4.5`, OIDs),
  or has four single-digit parts (`1.2.3.4`, `2.7.2.2`: versions; this loses 1.1.1.1 and
  8.8.8.8, public resolvers, not personal data).
  Loopback, unspecified (0.0.0.0, ::), link-local, multicast and reserved addresses are not personal and
  are left alone; private ranges are reported (they describe internal networks).
- credit_card: 13-19 digits, optionally in groups separated by one space or hyphen, that pass
  the Luhn check *and* start with a card network's prefix (Visa, Mastercard, Amex, Discover,
  JCB, Diners, UnionPay). Timestamps, UUIDs and hex hashes never match.
- secret: well-known token formats (AWS, GitHub, GitLab, Slack, Stripe, Google, OpenAI,
  Anthropic, Hugging Face, npm, PyPI, SendGrid, Twilio, JWTs), passwords inside URLs
  (`scheme://user:pass@host`), and `api_key/secret/token/password = "value"` assignments whose
  value looks random (16+ chars of [A-Za-z0-9+/=._~-], letters and digits, Shannon entropy
  >= 3.5 bits/char, not a placeholder such as YOUR_API_KEY). Hex hashes and UUIDs are secrets
  only when assigned to such a name. Also `.env`, shell-profile and ~/.aws/credentials lines,
  quoted or not: `AWS_SECRET_ACCESS_KEY=...`, `export DB_PASSWORD=...`, `set X_TOKEN=...`,
  `aws_secret_access_key = ...` at the start of a line. A password name takes any value that is
  not empty, a placeholder (`<your-password>`, changeme), an expansion (`${VAR}`, `$(cmd)`), a
  path or a URL; secret/token/API-key names take 12+ letters-and-digits of base64/hex/URL-safe
  characters; a bare KEY, and every `name = value` with spaces (how code assigns), only a
  random-looking value. Names that describe a secret (`*_FILE`, `*_URL`, `*_ID`, `MAX_TOKENS`)
  never count, nor does prose ("the password is required").
- private_key: PEM/OpenSSH `-----BEGIN ... PRIVATE KEY-----` blocks (to the END line, or to
  the end of the base64 body when the END line is missing).
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

KINDS: tuple[str, ...] = ("email", "phone", "ip", "credit_card", "secret", "private_key")

# When two matches overlap, the kind earlier here wins (then the longer match).
_PRIORITY = {k: i for i, k in enumerate(("private_key", "secret", "credit_card", "email", "ip", "phone"))}


@dataclass(frozen=True)
class Match:
    kind: str
    start: int
    end: int
    text: str


# Python's `re` scans a character class at ~10 MB/s, too slow for a corpus. Each detector
# first finds cheap anchors (a literal with str.find, or one light regex), then runs its
# precise pattern only on the lines around them. Lines, because none of these spans a line
# (private keys are handled apart); regexes run with pos/endpos = the line's bounds.


def _line_bounds(text: str, i: int) -> tuple[int, int]:
    lo = text.rfind("\n", 0, i) + 1
    hi = text.find("\n", i)
    return lo, len(text) if hi < 0 else hi


def _lines_with(text: str, needle: str) -> list[tuple[int, int]]:
    """The bounds of each line that contains `needle`, in order, each once."""
    out: list[tuple[int, int]] = []
    i = text.find(needle)
    while i >= 0:
        lo, hi = _line_bounds(text, i)
        out.append((lo, hi))
        i = text.find(needle, hi)
    return out


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(set(spans))


def _scan(pattern: re.Pattern, text: str, lines: Iterable[tuple[int, int]]) -> Iterable[re.Match]:
    for lo, hi in lines:
        yield from pattern.finditer(text, lo, hi)


# ---------------------------------------------------------------- email

_EMAIL = re.compile(
    r"(?<![\w.%+@-])"
    r"[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,62}[A-Za-z0-9_%+-])?"
    r"@(?!self\.|cls\.)(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![\w-]|\.[A-Za-z0-9])"
)


_URL_USERINFO_BEFORE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@]*$")


def _emails(text: str) -> Iterable[tuple[int, int]]:
    for m in _scan(_EMAIL, text, _lines_with(text, "@")):
        # `https://user@host`, `ftp://user:pw@host`: URL credentials, not addresses
        if _URL_USERINFO_BEFORE.search(text, max(0, m.start() - 200), m.start()):
            continue
        # `git@github.com:org/repo.git`: an scp-style remote, not an address
        if text[m.end():m.end() + 1] == ":" and text[m.end() + 1:m.end() + 2] not in ("", " ", "\t", "\n"):
            continue
        yield m.span()


# ---------------------------------------------------------------- phone, ip, card: digit runs

# Anchor for the digit-based kinds: a run of 7+ characters of digits and separators, found
# on an ASCII copy where every digit is "0" (one byte per character, so offsets agree), because
# a pattern that starts with a literal is ~10x faster in `re` than one that starts with \d.
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_DIGIT_RUN = re.compile(rb"0[0 .()-]{5,}0")


def _digit_lines(text: str) -> list[tuple[int, int]]:
    zeroed = text.encode("ascii", "replace").translate(_ZERO_DIGITS)
    spans, last_hi = [], -1
    for m in _DIGIT_RUN.finditer(zeroed):
        if m.start() < last_hi:
            continue
        lo, hi = _line_bounds(text, m.start())
        spans.append((lo, hi))
        last_hi = hi
    return spans


_PHONE_INTL = re.compile(
    r"(?<![\w+])\+[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,5})(?:[ .-]?\d{2,5}){1,4}(?![\w-]|\.\d)"
)
_PHONE_NANP = re.compile(
    r"(?<![\w.+/-])(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[.-])[2-9]\d{2}[.-]\d{4}(?![\w-]|\.\d)"
)


def _valid_phone(s: str, region: str | None) -> bool:
    import phonenumbers  # libphonenumber's metadata: which numbers exist in which country

    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(s, region))
    except phonenumbers.NumberParseException:
        return False


def _phones(text: str) -> Iterable[tuple[int, int]]:
    lines = _digit_lines(text)
    if "+" in text:
        for m in _scan(_PHONE_INTL, text, lines):
            if 8 <= sum(c.isdigit() for c in m.group()) <= 15 and _valid_phone(m.group(), None):
                yield m.span()
    for m in _scan(_PHONE_NANP, text, lines):
        if _valid_phone(m.group(), "US"):
            yield m.span()


_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\w)")
_VERSION_BEFORE = re.compile(r"""(?:\b[vV]|version\w*["']?[ :=]*["']?|release |sections? "?|\u00a7 ?|[=<>~!]=\s*|[<>]\s*)$""", re.IGNORECASE)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:.])")
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def _is_personal_ip(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if addr.version == 4 and addr in _THIS_NETWORK:
        return False
    return not (addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_reserved or addr.is_link_local)


_IPV6_ANCHOR = re.compile(r":[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:")


def _ipv6_lines(text: str) -> list[tuple[int, int]]:
    spans = _lines_with(text, "::")
    spans.extend(_line_bounds(text, m.start()) for m in _IPV6_ANCHOR.finditer(text))
    return _merge(spans)


def _ips(text: str) -> Iterable[tuple[int, int]]:
    if "." in text:
        for m in _scan(_IPV4, text, _digit_lines(text)):
            parts = m.group().split(".")
            if any(len(p) > 1 and p[0] == "0" for p in parts):
                continue  # leading zeros: not how addresses are written
            if all(len(p) == 1 for p in parts):
                continue  # 1.2.3.4, 2.7.2.2: version and section numbers (costs 1.1.1.1, 8.8.8.8)
            if _VERSION_BEFORE.search(text, max(0, m.start() - 24), m.start()):
                continue
            try:
                addr = ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            if _is_personal_ip(addr):
                yield m.span()
    if ":" in text:
        for m in _scan(_IPV6, text, _ipv6_lines(text)):
            s = m.group()
            if "::" not in s and s.count(":") != 7:
                continue
            if len([g for g in re.split(r"::?", s) if g]) < 2 or not any(c.isdigit() for c in s):
                continue
            try:
                addr = ipaddress.IPv6Address(s)
            except ValueError:
                continue
            if _is_personal_ip(addr):
                yield m.span()


_CARD = re.compile(r"(?<![\w.,/:+-])\d(?:[ -]?\d){12,18}(?![\w/:+]|[.,-]\d)")
_CARD_PREFIX = re.compile(
    r"^(?:4\d{12}(?:\d{3}){0,2}"  # Visa
    r"|5[1-5]\d{14}|2(?:2[2-9][1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)\d{12}"  # Mastercard
    r"|3[47]\d{13}"  # Amex
    r"|6(?:011|5\d\d|4[4-9]\d)\d{12,15}"  # Discover
    r"|35(?:2[89]|[3-8]\d)\d{12,15}"  # JCB
    r"|3(?:0[0-5]|[68]\d)\d{11,16}"  # Diners
    r"|62\d{14,17})$"  # UnionPay
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum used by payment cards."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _cards(text: str) -> Iterable[tuple[int, int]]:
    for m in _scan(_CARD, text, _digit_lines(text)):
        s = m.group()
        seps = {c for c in s if not c.isdigit()}
        if len(seps) > 1:
            continue
        digits = s.replace(" ", "").replace("-", "")
        if seps:
            # grouped like a card (4-4-4-4[-3], Amex 4-6-5), not arbitrary digit groups
            sizes = [len(g) for g in re.split(r"[ -]", s)]
            if not (all(n == 4 for n in sizes[:-1]) and 1 <= sizes[-1] <= 4) and sizes not in ([4, 6, 5], [4, 6, 4]):
                continue
        if _CARD_PREFIX.match(digits) and luhn_ok(digits) and len(set(digits)) > 1:
            yield m.span()


# ---------------------------------------------------------------- secrets

# (literal every match contains, pattern); the literal gates the regex with a fast `in`.
_SECRET_TOKENS = [
    (lit, re.compile(rf"(?<![A-Za-z0-9_]){pat}(?![A-Za-z0-9_])"))
    for lit, pat in (
        ("A", r"(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}"),  # AWS access key id
        ("_", r"gh[pousr]_[A-Za-z0-9]{36,255}"),  # GitHub
        ("github_pat_", r"github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}"),  # GitHub fine-grained
        ("glpat-", r"glpat-[A-Za-z0-9_-]{20}"),  # GitLab
        ("xox", r"xox[abposr]-[A-Za-z0-9-]{10,250}"),  # Slack token
        ("hooks.slack.com", r"https://hooks\.slack\.com/services/T[A-Za-z0-9_]+/B[A-Za-z0-9_]+/[A-Za-z0-9_]{20,}"),
        ("_live_", r"(?:sk|rk|pk)_live_[A-Za-z0-9]{20,99}"),  # Stripe
        ("_test_", r"(?:sk|rk|pk)_test_[A-Za-z0-9]{20,99}"),
        ("AIza", r"AIza[0-9A-Za-z_-]{35}"),  # Google API key
        ("sk-ant-", r"sk-ant-(?:api|admin)\d\d-[A-Za-z0-9_-]{80,120}"),  # Anthropic
        ("sk-", r"sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{40,200}"),  # OpenAI project keys
        ("T3BlbkFJ", r"sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}"),  # OpenAI legacy
        ("hf_", r"hf_[A-Za-z]{34}"),  # Hugging Face
        ("npm_", r"npm_[A-Za-z0-9]{36}"),  # npm
        ("pypi-AgEIcHlwaS5vcmc", r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}"),  # PyPI
        ("SG.", r"SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"),  # SendGrid
        ("SK", r"SK[0-9a-f]{32}"),  # Twilio
        ("eyJ", r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),  # JWT
    )
]
_SECRET_ANCHORS = {"A": ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"), "_": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_")}
_SECRET_GATED = [(_SECRET_ANCHORS.get(lit, (lit,)), pattern) for lit, pattern in _SECRET_TOKENS]
_URL_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@'\"]{1,64}:([^\s:/@'\"]{3,128})@[\w.-]+")
# `name = "value"` / `name: "value"`: patterns that start with the literal "=" or ":" are fast;
# the name before it must hold one of the keywords.
_ASSIGNED = [re.compile(lit + r"""\s*['"]([\w+/=.~-]{16,200})['"]""") for lit in ("=>?", ":")]
_KEYWORD_BEFORE = re.compile(r"""(?i)(?:key|secret|token|passwd|password|pwd)[\w.-]*['"]?\s*$""")
_PLACEHOLDER = re.compile(
    r"(?i)^(?:x+|\*+|<.*>|\$\{.*\}|\{\{.*\}\}|%\(.*\)s|pass(?:word|wd)?\d*|secret|pwd|test\w*|"
    r".*(?:your|example|changeme|dummy|placeholder|redacted|xxxx).*)$"
)


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _looks_random(value: str) -> bool:
    if _PLACEHOLDER.match(value) or not any(c.isdigit() for c in value) or not any(c.isalpha() for c in value):
        return False
    if re.fullmatch(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+", value):
        return False  # dotted identifiers: module.attr
    return _entropy(value) >= 3.5


# ---- `.env` files, shell profiles, ~/.aws/credentials: `NAME=value` at the start of a line.
# The name, split into words at `_ . -`, says what the value is: a password (any value that is
# not a placeholder), a secret/token/API key (a value that looks like a credential) or a bare
# KEY (only a random-looking value: SORT_KEY=created_at is not a secret). Names that describe a
# secret rather than hold it (DB_PASSWORD_FILE, TOKEN_URL, AWS_ACCESS_KEY_ID) never count.
_ENV_NEEDLES = ("pass", "pwd", "secret", "token", "key", "credential")
_ENV_LINE = re.compile(r"[ \t]*(?:(?:export|set)[ \t]+)?([A-Za-z_][A-Za-z0-9_.-]*)(=|[ \t]*[=:][ \t]*)")
_ENV_VALUE = re.compile(r"""'([^'\n]*)'|"([^"\n]*)"|([^\s'"`]+)""")
_NAME_WORDS = re.compile(r"[_.-]+")
_PASSWORD_WORDS = {"password", "passwd", "pwd", "pass", "passphrase"}
_SECRET_WORDS = {"secret", "token", "apikey", "credential", "credentials"}
_STRONG_KEY_BEFORE = {"api", "access", "private", "secret", "signing", "encryption", "master", "account", "service", "license", "auth"}
_NOT_THE_SECRET = {"file", "path", "dir", "url", "uri", "endpoint", "id", "name", "type", "kind", "len", "length", "size", "ttl",
                   "expiry", "expires", "expiration", "timeout", "header", "field", "env", "var", "alg", "algorithm", "prefix",
                   "count", "max", "min", "public", "pub", "hash", "policy", "rotation", "version", "arn", "region", "user",
                   "username", "host", "port", "mode", "format", "cmd", "command", "helper", "store", "source", "location",
                   "required", "enabled", "reset", "prompt", "label", "strength", "pattern", "regex", "rule", "rules"}
_NOT_A_VALUE = re.compile(
    r"(?i)^(?:true|false|yes|no|on|off|none|null|nil|undefined|unset|empty|required|optional|todo|tbd|fixme|\d+)$")
_SNAKE_WORDS = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9+/=_-]+")


def _env_name_kind(name: str) -> str | None:
    """password | secret | key | None, from the words of a variable name."""
    words = [w for w in _NAME_WORDS.split(name.lower()) if w]
    if not words or name in ("PWD", "OLDPWD") or _NOT_THE_SECRET.intersection(words):
        return None
    if _PASSWORD_WORDS.intersection(words):
        return "password"
    if _SECRET_WORDS.intersection(words):
        return "secret"
    for i, w in enumerate(words):
        if w == "key":
            return "secret" if i and words[i - 1] in _STRONG_KEY_BEFORE else "key"
    return None


def _env_value_counts(value: str, kind: str, spaced: bool) -> bool:
    """Whether `value`, assigned to a name of `kind`, is a real credential."""
    if (not value or value[0] in "$~/<" or "${" in value or "$(" in value or value.startswith(("./", "../"))
            or "://" in value or any(c in value for c in "()[]{},")):
        return False  # expansions, paths, URLs (their passwords are found apart), code
    if _NOT_A_VALUE.match(value) or _PLACEHOLDER.match(value) or value.strip(".*x-_") == "":
        return False
    if kind != "password" and not _TOKEN_CHARS.fullmatch(value):
        return False  # keys and tokens are base64, hex or URL-safe: `key="param:secp384r1.pem"` is not one
    if kind == "key" or spaced:  # `key = value` is also how code assigns: only random-looking values
        if kind == "password" and len(value) >= 8 and not re.fullmatch(r"[A-Za-z_]\w*(?:\.\w+)*", value) \
                and any(c.isalpha() for c in value) and not value.isalpha():
            return True  # `password = Tr0ub4dor&3`: not a name a program would assign
        return len(value) >= 16 and _looks_random(value)
    if kind == "password":
        return len(value) >= 6
    # secret/token/API key: long, letters and digits, not a snake_case word list
    return (len(value) >= 12 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)
            and not _SNAKE_WORDS.fullmatch(value) and _entropy(value) >= 3.0)


def _env_assignments(text: str) -> Iterable[tuple[int, int]]:
    if "=" not in text and ":" not in text:
        return
    low = text.lower()  # one pass per needle, whatever the case (lower() keeps offsets for ASCII)
    if len(low) != len(text):
        low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)
    for lo, hi in _merge(span for n in _ENV_NEEDLES for span in _lines_with(low, n)):
        m = _ENV_LINE.match(text, lo, hi)
        if not m:
            continue
        kind = _env_name_kind(m.group(1))
        if kind is None:
            continue
        spaced = m.group(2) != "="
        v = _ENV_VALUE.match(text, m.end(), hi)
        if not v:
            continue
        if spaced:
            # `name = value` (credentials files, INI, YAML): one bare token, then only a comment
            rest = text[v.end():hi].strip()
            if v.lastindex != 3 or (rest and not rest.startswith(("#", ";"))):
                continue
        elif text[v.end():hi].strip() and not text[v.end():hi].lstrip().startswith(("#", ";", "&&")):
            continue  # `A=1 command`: a shell prefix assignment followed by a command, or code
        if _env_value_counts(v.group(v.lastindex), kind, spaced):
            yield v.span(v.lastindex)


def _secrets(text: str) -> Iterable[tuple[int, int]]:
    for anchors, pattern in _SECRET_GATED:
        present = [a for a in anchors if a in text]
        if present:
            lines = _merge(span for a in present for span in _lines_with(text, a))
            for m in _scan(pattern, text, lines):
                yield m.span()
    if "://" in text:
        for m in _scan(_URL_PASSWORD, text, _lines_with(text, "://")):
            if not _PLACEHOLDER.match(m.group(1)):
                yield m.span(1)
    for pattern in _ASSIGNED:
        for m in pattern.finditer(text):
            if _KEYWORD_BEFORE.search(text, max(0, m.start() - 64), m.start()) and _looks_random(m.group(1)):
                yield m.span(1)
    yield from _env_assignments(text)


# ---------------------------------------------------------------- private keys

_PRIVATE_KEY = re.compile(
    r"-----BEGIN[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END[ A-Z0-9]*PRIVATE KEY(?: BLOCK)?-----|(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/=:,-][A-Za-z0-9+/=:, -]*)+)"
)


def _private_keys(text: str) -> Iterable[tuple[int, int]]:
    if "PRIVATE KEY" not in text:
        return
    for m in _PRIVATE_KEY.finditer(text):
        yield m.span()


_DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "email": _emails,
    "phone": _phones,
    "ip": _ips,
    "credit_card": _cards,
    "secret": _secrets,
    "private_key": _private_keys,
}


def _check_kinds(kinds: Iterable[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return KINDS
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in _DETECTORS]
    if bad:
        raise ValueError(f"unknown detector kind(s) {', '.join(map(repr, bad))}; valid: {', '.join(KINDS)}")
    return kinds


def find(text: str, kinds: Iterable[str] | None = None) -> list[Match]:
    """All matches of the given kinds, sorted by position; of overlapping ones the higher-priority kind wins."""
    found: list[tuple[int, int, str]] = []
    for kind in _check_kinds(kinds):
        found.extend((s, e, kind) for s, e in _DETECTORS[kind](text))
    # overlaps: the higher-priority kind wins, then the longer match, then the earlier one
    found.sort(key=lambda t: (_PRIORITY[t[2]], t[0] - t[1], t[0]))
    starts: list[int] = []
    kept: list[tuple[int, int, str]] = []
    for s, e, kind in found:
        i = bisect.bisect_right(starts, s)
        if (i and kept[i - 1][1] > s) or (i < len(kept) and kept[i][0] < e):
            continue
        starts.insert(i, s)
        kept.insert(i, (s, e, kind))
    out = [Match(kind, s, e, text[s:e]) for s, e, kind in kept]
    return out


def count(text: str, kinds: Iterable[str] | None = None) -> dict[str, int]:
    """How many matches of each kind (kinds with none are absent)."""
    return dict(Counter(m.kind for m in find(text, kinds)))


def redact(text: str, kinds: Iterable[str] | None = None, placeholder_fmt: str = "<{KIND}>") -> tuple[str, dict[str, int]]:
    """Replace each match by `placeholder_fmt` ({KIND} upper-case, {kind} as in KINDS)."""
    matches = find(text, kinds)
    if not matches:
        return text, {}
    parts, pos = [], 0
    for m in matches:
        parts.append(text[pos : m.start])
        parts.append(placeholder_fmt.format(KIND=m.kind.upper(), kind=m.kind))
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts), dict(Counter(m.kind for m in matches))
