"""The compiled keyed BLAKE2b against hashlib's, its oracle."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serve.features.pseudonym import WORK_WORDS, Pseudonyms, pseudonym

SECRETS = st.binary(min_size=16, max_size=80)


def compiled(pseudonyms: Pseudonyms, value: bytes, prefix: bytes = b"") -> int:
    buf = np.frombuffer(prefix + value, dtype=np.uint8)
    work = np.zeros(WORK_WORDS, dtype=np.uint64)
    return int(pseudonym(buf, len(prefix), len(value), pseudonyms.key_state, work))


@settings(max_examples=300, deadline=None)
@given(secret=SECRETS, value=st.text(max_size=300), prefix=st.binary(max_size=9))
def test_kernel_equals_hashlib(secret: bytes, value: str, prefix: bytes) -> None:
    """Every length (empty, one block, block boundaries, several blocks), any offset."""
    pseudonyms = Pseudonyms(secret)
    assert compiled(pseudonyms, value.encode(), prefix) == pseudonyms.of(value)


@pytest.mark.parametrize("length", [0, 1, 127, 128, 129, 256, 257])
def test_block_boundaries(length: int) -> None:
    pseudonyms = Pseudonyms(b"k" * 32)
    value = "x" * length
    assert compiled(pseudonyms, value.encode()) == pseudonyms.of(value)


def test_is_keyed_blake2b_of_the_derived_key() -> None:
    """The documented construction: BLAKE2b, 4-byte digest, keyed by the derived key."""
    secret = b"a secret of some length"
    key = hashlib.blake2b(secret, digest_size=32, person=b"streamscore.psd").digest()
    expected = hashlib.blake2b(b"203.0.113.7", key=key, digest_size=4).digest()
    assert Pseudonyms(secret).of("203.0.113.7") == int.from_bytes(expected, "little")


def test_depends_on_the_key_and_not_a_plain_hash() -> None:
    ip = "198.51.100.23"
    first, second = Pseudonyms(b"first secret 1234"), Pseudonyms(b"second secret 123")
    assert first.of(ip) != second.of(ip)
    assert first.of(ip) != zlib.crc32(ip.encode())


def test_short_secret_refused_and_never_shown() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        Pseudonyms(b"too short")
    secret = b"do-not-print-this-secret"
    pseudonyms = Pseudonyms(secret)
    assert secret.decode() not in repr(pseudonyms)
    assert secret.decode() not in str(pseudonyms)
