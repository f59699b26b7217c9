"""Shared CLI plumbing: node loading, CT resolution, JSON output, error to exit code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from vzbackup.config.node import Node
from vzbackup.ct import registry
from vzbackup.ct.container import Container
from vzbackup.errors import NotRootError, RuntimeFailure, UsageError, VzError


def node_of(ctx: click.Context) -> Node:
    return Node.load(ctx.obj["prefix"])


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRootError("this command must be run as root")


def container(ctx: click.Context, ident: str, *, must_exist: bool = True) -> Container:
    """The CT named by a CTID or name on the command line."""
    require_root()
    node = node_of(ctx)
    ct = Container(node, registry.resolve(node, ident))
    if must_exist:
        ct.conf  # noqa: B018 - raises NotFoundError / ConfigError
    return ct


def new_ips(ipadd: tuple[str, ...]) -> list[str] | None:
    """A new CT's ``--ipadd`` values (clone, restore), each address once: None when none
    was given, [] for 'none' (no address), which goes with no address."""
    from vzbackup.config.net import unique_ips  # (ipaddress: not on every command's start)

    if "none" in ipadd and len(ipadd) > 1:
        raise UsageError("--ipadd none means no address: don't give addresses with it")
    return unique_ips(ip for ip in ipadd if ip != "none") if ipadd else None


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)


def emit(as_json: bool, data: Any, text: str | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None:
        click.echo(text)


def run_guarded(cli: click.Group, args: list[str] | None = None,
                prog: str = "vzbackup") -> None:
    """Run the CLI (on *args*, default sys.argv); a VzError becomes '*prog*: error: ...' and
    its exit code."""
    try:
        rc = cli.main(args=args, prog_name=prog, standalone_mode=False)  # a click Exit's code
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except VzError as e:
        click.echo(f"{prog}: error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # e.g. a full disk or a vanished path: one line, no traceback
        where = f" ({e.filename})" if e.filename else ""
        click.echo(f"{prog}: error: {e.strerror or e}{where}", err=True)
        sys.exit(RuntimeFailure.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)


def ct_verb(name: str, action: Callable[[Container], object], done: str, doc: str) -> click.Command:
    """A command that takes one CTID, runs *action* on the CT and reports 'CT N <done>'."""

    @click.command(name=name, help=doc)
    @click.argument("ctid")
    @click.pass_context
    def command(ctx: click.Context, ctid: str) -> None:
        ct = container(ctx, ctid)
        action(ct)
        click.echo(f"CT {ct.ctid} {done}")

    return command
