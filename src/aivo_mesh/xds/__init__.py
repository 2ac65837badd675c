"""The control plane: mesh.yaml and discovery, served live over xDS (ADS, state of the world).

    cache      immutable, consistency-checked snapshots per node group; content-hash versions
    resources  typed Envoy resources of one node group, from the same renderer as the static bootstraps
    server     the ADS server (grpc.aio, mTLS): protocol state per stream, ACK/NACK per node and type
"""
