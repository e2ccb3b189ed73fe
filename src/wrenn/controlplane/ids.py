"""Identifiers and secrets the control plane mints, and how secrets are stored.

Sandbox ids are DNS labels (``{port}-{sandbox_id}.{domain}`` routes to them): lowercase
letters and digits only. Secrets are stored as SHA-256 digests; only their prefix is kept in
clear so a listing can tell keys apart.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string

_ALPHABET = string.ascii_lowercase + string.digits

API_KEY_PREFIX = "wrn_"
HOST_SECRET_PREFIX = "wrnh_"
HOST_TOKEN_PREFIX = "wrnr_"
CHANNEL_SECRET_PREFIX = "whsec_"
#: Characters of a key shown in listings (``wrn_`` plus eight).
SHOWN_PREFIX_LEN = 12

SANDBOX_ID = re.compile(r"^[a-z0-9]{1,64}$")
#: Template ids, snapshot ids and names: what the e2b SDK puts in a path segment.
RESOURCE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def sandbox_id() -> str:
    return "i" + _random(19)


def snapshot_id() -> str:
    return "s" + _random(19)


def team_id() -> str:
    return "team_" + _random(16)


def key_id() -> str:
    return "key_" + _random(16)


def host_id() -> str:
    return "host_" + _random(16)


def api_key() -> str:
    return API_KEY_PREFIX + secrets.token_hex(20)


def host_secret() -> str:
    return HOST_SECRET_PREFIX + secrets.token_hex(24)


def host_token() -> str:
    return HOST_TOKEN_PREFIX + secrets.token_hex(16)


def envd_access_token() -> str:
    return secrets.token_urlsafe(32)


def traffic_access_token() -> str:
    return secrets.token_urlsafe(32)


def channel_id() -> str:
    return "ch_" + _random(16)


def channel_secret() -> str:
    return CHANNEL_SECRET_PREFIX + secrets.token_hex(24)


def event_id() -> str:
    return "evt_" + _random(20)


def digest(secret: str) -> str:
    """How every secret is stored: hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def shown_prefix(secret: str) -> str:
    return secret[:SHOWN_PREFIX_LEN]


def is_sandbox_id(value: str) -> bool:
    return SANDBOX_ID.fullmatch(value) is not None


def is_resource_ref(value: str) -> bool:
    return RESOURCE_REF.fullmatch(value) is not None
