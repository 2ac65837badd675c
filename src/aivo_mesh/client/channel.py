"""Channel construction: mTLS credentials and the platform's channel options."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from aivo_mesh.config.model import KeepaliveSpec
    from aivo_mesh.pki import Identity


def channel_credentials(identity: Identity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_chain_pem,
    )


RECONNECT_INITIAL_MS = 250
RECONNECT_MAX_MS = 5000


def channel_options(keepalive: KeepaliveSpec, authority: str) -> list[tuple[str, object]]:
    """Options for a channel to one endpoint of service `authority`.

    `grpc.default_authority` makes TLS verify the server under its *service name* (a DNS SAN of its
    certificate) while we dial an IP; unlike `ssl_target_name_override` it does not bypass the check.
    Native retries stay off the table (no retryPolicy in the service config): MeshClient owns retries
    and stacking both would multiply attempts invisibly. Transparent retries remain on.
    """
    return [
        ("grpc.default_authority", authority),
        ("grpc.keepalive_time_ms", keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1 if keepalive.permit_without_calls else 0),
        ("grpc.http2.max_pings_without_data", keepalive.max_pings_without_data),
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # Our own pool: a channel per endpoint, never shared through grpc's global subchannel pool,
        # so closing or rebuilding one (certificate rotation) cannot disturb another.
        ("grpc.use_local_subchannel_pool", 1),
        # Reconnect back-off from 250 ms up to 5 s, not grpc's 1 s up to 120 s: a peer that was down (still
        # starting, or restarted by its supervisor within a second or two) is dialled again within seconds,
        # while a channel in back-off fails every call at once. A dead endpoint costs a connect attempt every
        # 5 s; the breaker and outlier detection keep calls off it meanwhile.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]
