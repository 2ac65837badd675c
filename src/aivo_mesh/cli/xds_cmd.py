"""`meshctl xds bootstrap SERVICE`: the bootstrap of gRPC's own xDS client for a service's processes.

A process started with `GRPC_XDS_BOOTSTRAP=<that file>` dials `xds:///<peer>` with
`grpc.xds_channel_credentials(...)` and takes the peer's routes, deadlines, retries, endpoints and mTLS
from the local mesh's control plane (docs/control-plane.md, "gRPC's built-in xDS client").
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from aivo_mesh.cli._complete import complete_services
from aivo_mesh.cli._root import cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.errors import StateError
from aivo_mesh.runtime.state import RuntimeInfo, StateDir


@cli.group("xds")
def xds() -> None:
    """gRPC's own xDS client against the mesh's control plane (proxyless gRPC)."""


@xds.command("bootstrap")
@click.argument("service", shell_complete=complete_services)
@state_dir_option()
@click.option("-f", "--file", "file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the bootstrap to FILE (default: print it)")
def bootstrap(service: str, state_dir: StateDir, file: Path | None) -> None:
    """The gRPC xDS bootstrap (JSON) of SERVICE's processes on the local mesh: the control plane's address
    (the running mesh's, else mesh.yaml's control_plane.address), mTLS to it with SERVICE's certificate
    from the state directory, the node (SERVICE's SPIFFE ID, `aivo.plane: proxyless`) and the file_watcher
    certificate provider the peers' clusters name for mTLS.

    \b
    meshctl xds bootstrap learner-svc -f learner-xds.json
    GRPC_XDS_BOOTSTRAP=learner-xds.json python app.py   # grpc.aio.secure_channel("xds:///auth-svc", ...)
    """
    from aivo_mesh.config.loader import find_mesh_file, load_mesh
    from aivo_mesh.fsutil import write_atomic
    from aivo_mesh.xds.proxyless import grpc_bootstrap

    mesh_file = state_dir.mesh_file if state_dir.mesh_file.exists() else find_mesh_file(None)
    mesh = load_mesh(mesh_file)
    if service not in mesh.service_names:
        raise click.BadParameter(f"{service!r} is not a service of {mesh_file} ({', '.join(mesh.service_names)})",
                                 param_hint="SERVICE")
    certs = state_dir.certs
    cert, key = certs.identity_paths(service)
    for path in (cert, key, certs.ca_cert):
        if not path.is_file():
            raise StateError(str(path), f"missing: {service}'s processes need their certificate, key and the CA "
                             "bundle; `meshctl up` issues them into the state directory (or `meshctl certs issue`)")
    info = RuntimeInfo.read(state_dir)
    if info is not None and info.control_plane:
        server = info.control_plane["address"]
    else:
        server = mesh.control_plane.address
        if info is not None:  # a mesh runs from here, but without a control plane (the proxyless plane)
            click.echo(f"warning: no control plane runs from {state_dir.root} (the {info.plane} plane); the "
                       f"bootstrap names mesh.yaml's control_plane.address {server}", err=True)
    text = json.dumps(grpc_bootstrap(mesh, service, server, cert=cert, key=key, ca=certs.ca_cert), indent=2) + "\n"
    if file is None:
        click.echo(text, nl=False)
        return
    write_atomic(file, text)
    click.echo(f"wrote {file}: start {service}'s processes with GRPC_XDS_BOOTSTRAP={file.resolve()}")
