"""CKKS secure aggregation (TenSEAL): keys made by the silos, ciphertext files, the coordinator's sum.

keys.py         parameters, secret and public contexts, fingerprints, key files
encoding.py     the ciphertext file (safetensors of uint8 blobs, with a header naming what they pack)
ciphertexts.py  the silos' half: encrypt a weighted delta; decrypt, divide and check the aggregate
aggregate.py    the coordinator's half: check an upload, add uploads (public context only)
cyclic.py       the silos' half of the cyclic mode's ring: mask, add to the running sum, unmask
"""

from fedmeki_core.privacy.he.aggregate import add_ciphertext_files, verify_ciphertext_file, write_ciphertext_sum
from fedmeki_core.privacy.he.ciphertexts import (
    AggregateCheckError,
    decrypt_mean,
    encrypt_file,
    write_encrypted,
)
from fedmeki_core.privacy.he.encoding import CiphertextHeader, EncryptedTensor, parse_header, read_ciphertext_header
from fedmeki_core.privacy.he.keys import (
    PUBLIC_FILE,
    SECRET_FILE,
    SLOTS,
    CkksContext,
    generate_context,
    load_public_context,
    public_bytes,
    read_secret_context,
    write_key_files,
)

__all__ = [
    "PUBLIC_FILE",
    "SECRET_FILE",
    "SLOTS",
    "AggregateCheckError",
    "CiphertextHeader",
    "CkksContext",
    "EncryptedTensor",
    "add_ciphertext_files",
    "decrypt_mean",
    "encrypt_file",
    "generate_context",
    "load_public_context",
    "parse_header",
    "public_bytes",
    "read_ciphertext_header",
    "read_secret_context",
    "verify_ciphertext_file",
    "write_ciphertext_sum",
    "write_encrypted",
    "write_key_files",
]
