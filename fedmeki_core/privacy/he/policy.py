"""What a job with CKKS secure aggregation may ask for: the coordinator can only add ciphertexts.

So the server step must be the plain weighted sum (FedAvg's, which FedProx shares, at server learning rate 1):
server optimisers (momentum, Adam), robust aggregation (clip, median, trimmed mean, Krum), central DP (clipping and
noising plaintext updates) and an injector (which needs the plaintext model at the coordinator's site) are refused
with FAILED_PRECONDITION naming the field.
"""

from __future__ import annotations

from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.algorithms.robust import robust_aggregation
from fedmeki_core.errors import PreconditionError
from fedmeki_core.jobspec import JobSpec

ADDITIVE_ALGORITHMS = ("fedavg", "fedprox")


def uses_ckks(spec: JobSpec) -> bool:
    """Updates are CKKS ciphertexts and checkpoints encrypted sums: the star mode ("ckks") and the ring ("cyclic")."""
    return spec.privacy.secure_aggregation in ("ckks", "cyclic")


def uses_cyclic(spec: JobSpec) -> bool:
    """The encrypted running sum goes silo to silo through the coordinator, which only relays it."""
    return spec.privacy.secure_aggregation == "cyclic"


def require_additive(spec: JobSpec) -> None:
    """Raise PreconditionError when a CKKS job needs a server step other than adding the silos' ciphertexts."""
    if not uses_ckks(spec):
        return
    why = (
        f"with privacy.secure_aggregation {spec.privacy.secure_aggregation} the model's step can only be the sum of "
        "the silos' ciphertexts"
    )
    name = spec.algorithm.name
    if name not in ADDITIVE_ALGORITHMS:
        raise PreconditionError(
            f"algorithm.name: {name} needs the plaintext mean at the server; {why} "
            f"(use {' or '.join(ADDITIVE_ALGORITHMS)})"
        )
    options = get_algorithm(name).resolve_options(spec.algorithm.options)
    if float(options["server_learning_rate"]) != 1.0:
        raise PreconditionError(f"algorithm.options.server_learning_rate: must be 1 (the plain mean); {why}")
    robust = robust_aggregation(spec.algorithm.options).method
    if robust != "none":
        raise PreconditionError(
            f"algorithm.options.robust: {robust} looks at each silo's plaintext update at the server; {why}"
        )
    if spec.privacy.dp is not None and spec.privacy.dp.mode == "central":
        raise PreconditionError(
            f"privacy.dp.mode: central DP clips and noises plaintext updates at the coordinator; {why} "
            "(use mode local: each silo clips and noises before it encrypts)"
        )
    if spec.injection is not None and not spec.injection.federated:
        raise PreconditionError(
            f"injection: the injector works on the plaintext model at the coordinator's site; {why} "
            "(use injection.federated: true)"
        )
