"""Put back the protobuf modules that `xds-protos` overwrites when it is installed after them.

xds-protos (the Envoy API for Python, which the control plane needs) ships its own, older copies of
`opentelemetry/proto/...` and `google/api`, `google/rpc`, ... in the same directories as the packages
that own them. Whichever is installed last wins; with xds-protos last, the OpenTelemetry exporter fails
to import (`cannot import name 'InstrumentationScope'`). This reinstalls the owners' files, at the
versions already installed (so nothing else changes). `make` runs it after every install.

    python tools/unshadow_protos.py        # in the environment to repair
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys

OWNERS = ("opentelemetry-proto", "googleapis-common-protos")


def main() -> int:
    pins = []
    for name in OWNERS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    if not pins:
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", *pins])


if __name__ == "__main__":
    sys.exit(main())
