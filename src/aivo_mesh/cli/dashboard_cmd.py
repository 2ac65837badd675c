"""`meshctl dashboard`: where the running mesh's web dashboard is (its observer serves it on loopback)."""

from __future__ import annotations

import click

from aivo_mesh.cli._root import cli
from aivo_mesh.cli._state import state_dir_option
from aivo_mesh.runtime.state import RuntimeInfo, StateDir

ANSWER_TIMEOUT = 3.0  # seconds the observer gets to answer for the dashboard


@cli.command()
@state_dir_option()
@click.option("--open", "open_browser", is_flag=True, help="also open it in a web browser")
def dashboard(state_dir: StateDir, open_browser: bool) -> None:
    """Print the URL of the web dashboard of the mesh `meshctl up` runs (exit 2 when none runs).

    The page shows the topology, golden metrics over time, breakers and retry budgets, the control
    plane's ACKs and NACKs and recent failed traces, from the mesh's observer on 127.0.0.1."""
    import urllib.error
    import urllib.request

    from aivo_mesh.telemetry.dashboard import dashboard_url

    info = RuntimeInfo.read(state_dir) if state_dir.running() else None
    if info is None or not info.observer:
        why = "no mesh runs" if info is None else "the mesh running there has no observer"
        click.secho(f"error: {why} from {state_dir.root}: start one with `meshctl up` (or name its "
                    "--state-dir); the dashboard is served by the running mesh", fg="red", err=True)
        raise click.exceptions.Exit(2)
    url = dashboard_url(info.observer)
    try:
        with urllib.request.urlopen(url, timeout=ANSWER_TIMEOUT) as answer:
            answer.read()
    except (OSError, urllib.error.URLError) as exc:
        click.secho(f"error: the observer at {info.observer} does not serve the dashboard ({exc}); its log: "
                    f"{state_dir.root / 'logs' / 'observer.log'}", fg="red", err=True)
        raise click.exceptions.Exit(1) from None
    click.echo(url)
    if open_browser:
        import webbrowser

        if not webbrowser.open(url):
            click.echo("no web browser could be started here: open the address above", err=True)
