"""Path validation of a leaf against the mesh trust bundle with `cryptography.x509.verification`."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError


def chain_problem(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime,
    *,
    strict: bool = False,
) -> str | None:
    """Why `leaf` (+ the intermediates it was sent with) does not chain to `anchors` at `now`, or None.

    The CA side is always checked with the WebPKI rules (CA:TRUE, keyCertSign, path length, validity,
    signatures, RSA >= 2048). `strict=True` also applies the WebPKI end-entity rules as for a TLS
    client certificate (EKU clientAuth, SAN present, no CA:TRUE ...); `strict=False` leaves end-entity
    extension checks to the caller, which reports them with mesh-specific messages.
    """
    if not anchors:
        return "the CA bundle holds no certificate"
    builder = PolicyBuilder().store(Store(anchors)).time(now)
    if not strict:
        builder = builder.extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all()
        )
    try:
        builder.build_client_verifier().verify(leaf, intermediates)
    except VerificationError as exc:
        return f"does not chain to the CA bundle: {exc}"
    return None
