"""The PKI's parameters: key types and lifetimes. No `cryptography` here: `meshctl certs` builds its
options (choices, defaults, help) from these without loading it."""

from __future__ import annotations

from typing import Literal, get_args

KeyType = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096"]
KEY_TYPES: tuple[str, ...] = get_args(KeyType)
DEFAULT_KEY_TYPE: KeyType = "ec-p256"
MIN_RSA_BITS = 2048

ROOT_VALID_DAYS = 3650
LEAF_VALID_DAYS = 365
