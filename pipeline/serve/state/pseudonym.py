"""Keyed pseudonyms of the values user state keeps only to compare: device ids, IPs, card
fingerprints and countries.

State stores, per user, which of those values it has seen; it never needs the value itself,
only whether a new one equals an old one. An unkeyed hash (CRC-32, which the state used to
keep) is no protection: there are 2**32 IPv4 addresses, so hashing each of them recovers an
IP from its CRC in about a minute. A keyed hash cannot be inverted that way without the
key. The pseudonym is SipHash-2-4 (Aumasson and Bernstein, 2012), a pseudorandom function
made for short inputs, under a 128-bit key derived from the secret, truncated to 32 bits,
the width the state already had.

Why SipHash and not BLAKE2b, which the first version used: a keyed BLAKE2b of a short value
is one 128-byte compression, 0.24-0.4 µs in the compiled kernel, and an event has up to four
values, which made the pseudonyms about a quarter of the features stage. SipHash-2-4 of a
15-byte value is about 27 ns here. Both are PRFs under a secret key; at a 32-bit output the
truncation, not the function, bounds what a collision costs.

What a collision costs at 32 bits: a user's new value that happens to equal one of the
at most `state.MAX_SEEN` values remembered for its kind is taken as already seen, so that one
event's "new device/IP/card/country" flag and distinct count are one short. The chance is
at most MAX_SEEN / 2**32 (about 4 in a billion) per event and kind.

The compiled kernel is hand-written because numba cannot call a library's SipHash;
`siphash24`, a line-by-line Python transcription of the reference, is its oracle, and
tests check both against the reference's published test vectors.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

from pipeline.serve.kernel import inline_kernel, kernel
from pipeline.settings import MIN_SECRET_BYTES

_KEY_BYTES = 32
_PERSON = b"streamscore.psd"  # the derivation's domain: another use of the secret differs
_PSEUDONYM_PERSON = b"streamscore.sip"  # the pseudonyms' own key, apart from `digest`'s
_MASK = (1 << 64) - 1
# "somepseudorandomlygeneratedbytes", the reference's initial state (little-endian words).
_INIT = (0x736F6D6570736575, 0x646F72616E646F6D, 0x6C7967656E657261, 0x7465646279746573)
_V0, _V1, _V2, _V3 = (np.uint64(word) for word in _INIT)


def siphash24(key: bytes, data: bytes) -> int:
    """SipHash-2-4 of `data` under a 16-byte `key`: the readable reference of the kernel."""
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")
    v = [k0 ^ _INIT[0], k1 ^ _INIT[1], k0 ^ _INIT[2], k1 ^ _INIT[3]]

    def rotl(x: int, b: int) -> int:
        return ((x << b) | (x >> (64 - b))) & _MASK

    def sip_round() -> None:
        v[0] = (v[0] + v[1]) & _MASK
        v[1] = rotl(v[1], 13) ^ v[0]
        v[0] = rotl(v[0], 32)
        v[2] = (v[2] + v[3]) & _MASK
        v[3] = rotl(v[3], 16) ^ v[2]
        v[0] = (v[0] + v[3]) & _MASK
        v[3] = rotl(v[3], 21) ^ v[0]
        v[2] = (v[2] + v[1]) & _MASK
        v[1] = rotl(v[1], 17) ^ v[2]
        v[2] = rotl(v[2], 32)

    whole = len(data) - len(data) % 8
    last = int.from_bytes(data[whole:], "little") | (len(data) & 0xFF) << 56
    for word in [int.from_bytes(data[i : i + 8], "little") for i in range(0, whole, 8)] + [last]:
        v[3] ^= word
        sip_round()
        sip_round()
        v[0] ^= word
    v[2] ^= 0xFF
    for _ in range(4):
        sip_round()
    return v[0] ^ v[1] ^ v[2] ^ v[3]


@inline_kernel
def _rotl(x: np.uint64, b: int) -> np.uint64:
    return (x << np.uint64(b)) | (x >> np.uint64(64 - b))


@inline_kernel
def _round(
    v0: np.uint64, v1: np.uint64, v2: np.uint64, v3: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    """One SipRound, on values (locals stay in registers; array slots would not)."""
    v0 += v1
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 += v3
    v3 = _rotl(v3, 16) ^ v2
    v0 += v3
    v3 = _rotl(v3, 21) ^ v0
    v2 += v1
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


@kernel
def siphash(key_state: np.ndarray, buf: np.ndarray, start: int, length: int) -> np.uint64:
    """`siphash24` of `buf[start:start + length]` under the key words `key_state`."""
    k0, k1 = key_state[0], key_state[1]
    v0, v1, v2, v3 = k0 ^ _V0, k1 ^ _V1, k0 ^ _V2, k1 ^ _V3
    whole = start + length - (length & 7)
    for at in range(start, whole, 8):
        word = np.uint64(0)
        for k in range(8):
            word |= np.uint64(buf[at + k]) << np.uint64(8 * k)
        v3 ^= word
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
        v0 ^= word
    word = np.uint64(length & 0xFF) << np.uint64(56)
    for k in range(length & 7):
        word |= np.uint64(buf[whole + k]) << np.uint64(8 * k)
    v3 ^= word
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    v0 ^= word
    v2 ^= np.uint64(0xFF)
    for _ in range(4):
        v0, v1, v2, v3 = _round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


@kernel
def pseudonym(buf: np.ndarray, start: int, length: int, key_state: np.ndarray) -> int:
    """`Pseudonyms.of` the UTF-8 bytes `buf[start:start + length]`: keyed SipHash-2-4 cut to
    32 bits, as an int in [0, 2**32).
    """
    return int(siphash(key_state, buf, start, length) & np.uint64(0xFFFFFFFF))


class Pseudonyms:
    """Pseudonyms under one secret. The secret is stretched (BLAKE2b) into the pseudonyms'
    SipHash key and the digests' BLAKE2b key, so a secret of any length from
    MIN_SECRET_BYTES works; none of them appears in a repr.
    """

    __slots__ = ("_key", "_pseudonym_key", "key_state")

    def __init__(self, secret: bytes) -> None:
        """Pseudonyms keyed by `secret` (at least MIN_SECRET_BYTES bytes)."""
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a pseudonym secret needs at least {MIN_SECRET_BYTES} bytes")
        self._key = hashlib.blake2b(secret, digest_size=_KEY_BYTES, person=_PERSON).digest()
        self._pseudonym_key = hashlib.blake2b(
            secret, digest_size=16, person=_PSEUDONYM_PERSON
        ).digest()
        key = self._pseudonym_key  # the kernel's key words, k0 and k1
        self.key_state = np.array(
            [int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")], np.uint64
        )

    @classmethod
    def ephemeral(cls) -> Pseudonyms:
        """Under a fresh random secret: for state that lives only as long as this object
        (offline feature computation, benchmarks), where only equality matters.
        """
        return cls(secrets.token_bytes(32))

    def of(self, value: str) -> int:
        """The pseudonym of `value` (the readable reference of the kernel `pseudonym`)."""
        return siphash24(self._pseudonym_key, value.encode()) & 0xFFFFFFFF

    def digest(self, payload: bytes, domain: bytes = b"dead-letter") -> str:
        """A keyed BLAKE2b-128 of `payload`, hex: a redacted dead letter's payload_hash, or
        (another `domain`, at most 16 bytes) the subject of an erasure record. Each domain
        hashes apart, so no digest equals another domain's or a pseudonym.
        """
        digest = hashlib.blake2b(payload, key=self._key, digest_size=16, person=domain)
        return digest.hexdigest()

    def __repr__(self) -> str:
        """No key material."""
        return "Pseudonyms(<secret>)"
