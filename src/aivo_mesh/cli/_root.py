"""The root `meshctl` group; command modules attach to it."""

from __future__ import annotations

import click

# Every port a meshctl option takes (an int would let `--port 70000` reach the OS, which binds another port).
PORT = click.IntRange(1, 65535)


class MeshctlGroup(click.Group):
    """A group that never names its hidden commands (process entry points) in "Did you mean ...?"."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None,
                                                                             list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError:
            name = args[0]
            if self.get_command(ctx, name) is not None:
                raise
            import difflib

            shown = [n for n, c in self.commands.items() if not c.hidden]
            close = difflib.get_close_matches(name, shown)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise click.UsageError(f"No such command {name!r}.{hint}", ctx) from None


MeshctlGroup.group_class = MeshctlGroup  # `@group.group()` makes subgroups of the same kind


@click.group(cls=MeshctlGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="aivo-mesh", prog_name="meshctl")
def cli() -> None:
    """aivo-mesh: the Aivo platform's gRPC service mesh."""
