"""Sealed store values: every value the runtime writes is encrypted and authenticated with the group's key.

The store's connections are already authenticated (store.py), so a client without the token cannot talk to
it at all. Sealing each value as well keeps the guarantee independent of the transport: a value is only
acted on if it was written by a holder of the token for exactly this key name, epoch and formation, so a
value copied to another key, replayed from an earlier sync, formation or epoch, or altered in any byte fails
to open, and anything secret in it (the NCCL unique id, the manifest) is never readable in transit or by a
store that is not ours. AES-256-GCM from `cryptography`, a fresh random 96-bit nonce per value; the key
name, epoch and formation are the associated data.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from weightsync.runtime.errors import TamperedValueError

_NONCE_BYTES = 12
_VALUE_KEY_LABEL = b"weightsync store values v1"


def derive_key(token: str, label: bytes) -> bytes:
    """A 256-bit key for one purpose (`label`), derived from the group's token."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(token.encode())


class Sealer:
    """Seals and opens the values of one group; the associated data binds each to its place."""

    def __init__(self, token: str) -> None:
        self._aead = AESGCM(derive_key(token, _VALUE_KEY_LABEL))

    def seal(self, key: str, value: bytes) -> bytes:
        """`key` is the full key name, which holds the group, the epoch, the formation and the sync."""
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value, key.encode())

    def open(self, key: str, sealed: bytes) -> bytes:
        """The value written under `key`, or TamperedValueError naming the key: never a forged value."""
        if len(sealed) < _NONCE_BYTES + 16:
            raise TamperedValueError(key, "too short to be a sealed value")
        try:
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:],
                                      key.encode())
        except InvalidTag:
            raise TamperedValueError(key, "it fails authentication (not written by a member of this group "
                                          "for this key, epoch and formation)") from None
