"""vzbackup template build|list|remove: the OS template cache (TEMPLATE/cache)."""

from __future__ import annotations

import time

import click

from vzbackup.cli.common import emit, json_option, node_of, require_root
from vzbackup.template import cache, debian


@click.group()
def template() -> None:
    """Build, list and remove OS templates."""


@template.command()
@click.argument("name")
@click.option(
    "--packages",
    multiple=True,
    help="Packages to install besides systemd-sysv and iproute2 (comma/space separated, "
    "repeatable; replaces the default set, '' for none).",
)
@click.option("--mirror", help="Debian mirror URL (default http://deb.debian.org/debian).")
@click.option("--force", is_flag=True, help="Rebuild even if the template exists.")
@json_option
@click.pass_context
def build(
    ctx: click.Context, name: str, packages: tuple[str, ...], mirror: str | None, force: bool,
    as_json: bool,
) -> None:
    """Build OS template NAME (debian-12-x86_64, debian-13-x86_64[-FLAVOUR]) with mmdebstrap."""
    require_root()
    node = node_of(ctx)
    recipe = debian.recipe_for(name, debian.split_packages(packages) if packages else None, mirror)
    progress = (lambda line: click.echo(f"  {line}", err=True)) if not as_json else None
    result = debian.build(node.template_cache, recipe, force=force, progress=progress)
    size = result.path.stat().st_size
    verdict = "up to date" if result.up_to_date else f"built in {result.seconds:.0f} s"
    emit(
        as_json,
        {**recipe.as_dict(), "path": str(result.path), "size": size,
         "up_to_date": result.up_to_date, "seconds": round(result.seconds, 1)},
        f"{result.path}: {verdict} ({size / 1e6:.0f} MB)",
    )


@template.command(name="list")
@json_option
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> None:
    """List the templates in the cache."""
    infos = cache.list_templates(node_of(ctx).template_cache)
    lines = [f"{'NAME':32} {'SIZE':>8}  {'MODIFIED':19}  RECIPE"]
    for t in infos:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.mtime))
        recipe = (f"debian {t.recipe.get('suite')}, {len(t.recipe.get('packages', []))} packages"
                  if t.recipe else "-")
        lines.append(f"{t.name:32} {t.size / 1e6:7.0f}M  {when}  {recipe}")
    emit(as_json, [t.as_dict() for t in infos], "\n".join(lines))


@template.command()
@click.argument("name")
@json_option
@click.pass_context
def remove(ctx: click.Context, name: str, as_json: bool) -> None:
    """Remove template NAME (all its formats) from the cache."""
    require_root()
    removed = cache.remove_template(node_of(ctx).template_cache, name)
    emit(as_json, {"name": name, "removed": [str(p) for p in removed]},
         f"removed {', '.join(p.name for p in removed)}")


COMMANDS = [template]
