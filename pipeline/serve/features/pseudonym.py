"""Keyed pseudonyms of the values user state keeps only to compare: device ids, IPs, card
fingerprints and countries.

State stores, per user, which of those values it has seen; it never needs the value itself,
only whether a new one equals an old one. An unkeyed hash (CRC-32, which the state used to
keep) is no protection: there are 2**32 IPv4 addresses, so hashing each of them recovers an
IP from its CRC in about a minute. A keyed hash cannot be inverted that way without the
key. The pseudonym is BLAKE2b (RFC 7693) keyed with a secret and truncated to 32 bits, the
width the state already had.

What a collision costs at 32 bits: a user's new value that happens to equal one of the
at most `state.MAX_SEEN` values remembered for its kind is taken as already seen, so that one
event's "new device/IP/card/country" flag and distinct count are one short. The chance is
at most MAX_SEEN / 2**32 (about 4 in a billion) per event and kind.

The compiled kernel is hand-written because numba cannot call hashlib; `Pseudonyms.of`
(hashlib's BLAKE2b) is its oracle, and tests compare them on random values and keys. The
key's block is compressed once, when the key is loaded, so one pseudonym of a value up to
128 bytes costs one BLAKE2b compression.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np
from numba import njit

from pipeline.serve.kernel import kernel
from pipeline.settings import MIN_SECRET_BYTES

DIGEST_BYTES = 4
_KEY_BYTES = 32
_PERSON = b"streamscore.psd"  # the derivation's domain: another use of the secret differs

_IV = np.array(
    [
        0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
        0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
    ],
    dtype=np.uint64,
)  # fmt: skip
# Workspace of one pseudonym: the chain (8 words) and the message block (16), so the hot
# loop allocates nothing.
WORK_WORDS = 24
_CHAIN, _BLOCK = 0, 8
# `Pseudonyms.key_state`: the chain after the key's block (8 words), then the pseudonym of
# the empty value (which has no block of its own: the key's block is its last).
_EMPTY = 8


@kernel
def _rotr(x: np.uint64, n: int) -> np.uint64:
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@kernel
def _mix(
    a: np.uint64, b: np.uint64, c: np.uint64, d: np.uint64, x: np.uint64, y: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    """RFC 7693's G, on values (locals stay in registers; array slots would not). LLVM
    inlines it; numba's own inline="always" gave the same speed for a compile of 70 s.
    """
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@kernel
def _compress(work: np.ndarray, counter: int, last: bool) -> None:
    """RFC 7693's F over the block in `work`, into the chain in `work`. The 12 rounds are
    unrolled with the message schedule (SIGMA) written out: 0.24 µs a pseudonym against
    0.38 µs for the loop over a SIGMA table (measured on this project's 2-core machine).
    """
    m = work[_BLOCK : _BLOCK + 16]
    v0, v1, v2, v3 = work[_CHAIN], work[_CHAIN + 1], work[_CHAIN + 2], work[_CHAIN + 3]
    v4, v5, v6, v7 = work[_CHAIN + 4], work[_CHAIN + 5], work[_CHAIN + 6], work[_CHAIN + 7]
    v8, v9, v10, v11 = _IV[0], _IV[1], _IV[2], _IV[3]
    v12, v13, v14, v15 = _IV[4] ^ np.uint64(counter), _IV[5], _IV[6], _IV[7]
    if last:
        v14 = ~v14
    m0, m1, m2, m3, m4, m5, m6, m7 = m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]
    m8, m9, m10, m11, m12, m13, m14, m15 = m[8], m[9], m[10], m[11], m[12], m[13], m[14], m[15]
    # Round 0: RFC 7693's SIGMA[0] orders the message words.
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m0, m1)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m2, m3)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m4, m5)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m6, m7)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m8, m9)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m10, m11)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m12, m13)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m14, m15)
    # Round 1, SIGMA[1].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m14, m10)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m4, m8)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m9, m15)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m13, m6)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m1, m12)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m0, m2)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m11, m7)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m5, m3)
    # Round 2, SIGMA[2].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m11, m8)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m12, m0)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m5, m2)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m15, m13)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m10, m14)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m3, m6)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m7, m1)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m9, m4)
    # Round 3, SIGMA[3].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m7, m9)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m3, m1)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m13, m12)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m11, m14)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m2, m6)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m5, m10)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m4, m0)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m15, m8)
    # Round 4, SIGMA[4].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m9, m0)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m5, m7)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m2, m4)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m10, m15)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m14, m1)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m11, m12)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m6, m8)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m3, m13)
    # Round 5, SIGMA[5].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m2, m12)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m6, m10)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m0, m11)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m8, m3)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m4, m13)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m7, m5)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m15, m14)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m1, m9)
    # Round 6, SIGMA[6].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m12, m5)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m1, m15)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m14, m13)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m4, m10)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m0, m7)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m6, m3)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m9, m2)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m8, m11)
    # Round 7, SIGMA[7].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m13, m11)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m7, m14)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m12, m1)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m3, m9)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m5, m0)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m15, m4)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m8, m6)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m2, m10)
    # Round 8, SIGMA[8].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m6, m15)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m14, m9)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m11, m3)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m0, m8)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m12, m2)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m13, m7)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m1, m4)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m10, m5)
    # Round 9, SIGMA[9].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m10, m2)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m8, m4)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m7, m6)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m1, m5)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m15, m11)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m9, m14)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m3, m12)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m13, m0)
    # Round 10, SIGMA[0].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m0, m1)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m2, m3)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m4, m5)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m6, m7)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m8, m9)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m10, m11)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m12, m13)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m14, m15)
    # Round 11, SIGMA[1].
    v0, v4, v8, v12 = _mix(v0, v4, v8, v12, m14, m10)
    v1, v5, v9, v13 = _mix(v1, v5, v9, v13, m4, m8)
    v2, v6, v10, v14 = _mix(v2, v6, v10, v14, m9, m15)
    v3, v7, v11, v15 = _mix(v3, v7, v11, v15, m13, m6)
    v0, v5, v10, v15 = _mix(v0, v5, v10, v15, m1, m12)
    v1, v6, v11, v12 = _mix(v1, v6, v11, v12, m0, m2)
    v2, v7, v8, v13 = _mix(v2, v7, v8, v13, m11, m7)
    v3, v4, v9, v14 = _mix(v3, v4, v9, v14, m5, m3)
    work[_CHAIN] ^= v0 ^ v8
    work[_CHAIN + 1] ^= v1 ^ v9
    work[_CHAIN + 2] ^= v2 ^ v10
    work[_CHAIN + 3] ^= v3 ^ v11
    work[_CHAIN + 4] ^= v4 ^ v12
    work[_CHAIN + 5] ^= v5 ^ v13
    work[_CHAIN + 6] ^= v6 ^ v14
    work[_CHAIN + 7] ^= v7 ^ v15


@kernel
def _load(work: np.ndarray, buf: np.ndarray, start: int, length: int) -> None:
    """Put `length` (≤ 128) bytes of `buf` from `start` in the block, zero-padded."""
    for i in range(16):
        work[_BLOCK + i] = 0
    for k in range(length):
        word = _BLOCK + (k >> 3)
        work[word] |= np.uint64(buf[start + k]) << np.uint64(8 * (k & 7))


@kernel
def pseudonym(
    buf: np.ndarray, start: int, length: int, key_state: np.ndarray, work: np.ndarray
) -> int:
    """`Pseudonyms.of` the UTF-8 bytes `buf[start:start + length]`: keyed BLAKE2b with a
    4-byte digest, as an int in [0, 2**32).
    """
    if length == 0:
        return int(key_state[_EMPTY])
    for i in range(8):
        work[_CHAIN + i] = key_state[i]
    counter = 128  # the key's block
    done = 0
    while length - done > 128:
        _load(work, buf, start + done, 128)
        done += 128
        counter += 128
        _compress(work, counter, False)
    _load(work, buf, start + done, length - done)
    _compress(work, counter + length - done, True)
    return int(work[_CHAIN] & np.uint64(0xFFFFFFFF))


@njit(cache=True, nogil=True)
def _key_state(key: np.ndarray) -> np.ndarray:
    """The chain after the key's block, and the pseudonym of the empty value."""
    work = np.zeros(WORK_WORDS, dtype=np.uint64)
    for i in range(8):
        work[_CHAIN + i] = _IV[i]
    # Parameter block: digest length, key length, fanout 1, depth 1.
    work[_CHAIN] ^= np.uint64(0x01010000 | (len(key) << 8) | DIGEST_BYTES)
    _load(work, key, 0, len(key))
    state = np.zeros(9, dtype=np.uint64)
    saved = work.copy()
    _compress(work, 128, False)
    state[:8] = work[_CHAIN : _CHAIN + 8]
    _compress(saved, 128, True)  # the key's block as the last: the empty value
    state[_EMPTY] = saved[_CHAIN] & np.uint64(0xFFFFFFFF)
    return state


class Pseudonyms:
    """Pseudonyms under one secret. The secret is stretched into the BLAKE2b key, so a
    secret of any length from MIN_SECRET_BYTES works; neither appears in a repr.
    """

    __slots__ = ("_key", "key_state")

    def __init__(self, secret: bytes) -> None:
        """Pseudonyms keyed by `secret` (at least MIN_SECRET_BYTES bytes)."""
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a pseudonym secret needs at least {MIN_SECRET_BYTES} bytes")
        self._key = hashlib.blake2b(secret, digest_size=_KEY_BYTES, person=_PERSON).digest()
        self.key_state = _key_state(np.frombuffer(self._key, dtype=np.uint8))

    @classmethod
    def ephemeral(cls) -> Pseudonyms:
        """Under a fresh random secret: for state that lives only as long as this object
        (offline feature computation, benchmarks), where only equality matters.
        """
        return cls(secrets.token_bytes(32))

    def of(self, value: str) -> int:
        """The pseudonym of `value` (the readable reference of the kernel `pseudonym`)."""
        digest = hashlib.blake2b(value.encode(), key=self._key, digest_size=DIGEST_BYTES)
        return int.from_bytes(digest.digest(), "little")

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
