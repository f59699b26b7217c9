"""Classic OpenVZ command lines as vzbackup command lines: one table per program.

``translate(prog, argv, node)`` returns the vzbackup argument lists to run in order (most
classic commands are one vzbackup verb; ``vzdump`` is ``dump`` then ``export`` of each new
snapshot into the dump directory, the archive the classic tool wrote). Options are rewritten
by the tables below; an option no table names goes through unchanged, so vzbackup's own
options work too and a wrong one gets vzbackup's error.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field

from vzbackup.config.node import Node
from vzbackup.ct import registry
from vzbackup.errors import UsageError

Tokens = list[str]


@dataclass(frozen=True)
class Opt:
    """How one classic option is written for vzbackup: *out* tokens for a flag, or a function
    of the option's value; *front*: a vzbackup option that goes before the verb (-v);
    *ignored*: accepted for compatibility and dropped, with this reason on stderr."""

    out: tuple[str, ...] | Callable[[str], Tokens] = ()
    front: bool = False
    ignored: str = ""

    @property
    def takes_value(self) -> bool:
        return callable(self.out)

    def tokens(self, value: str | None) -> Tokens:
        return self.out(value or "") if callable(self.out) else list(self.out)


def same(name: str) -> Opt:
    """An option with a value, written as vzbackup spells it (*name*)."""
    return Opt(lambda v: [name, v])


def dropped(reason: str, *, valued: bool = False) -> Opt:
    return Opt((lambda v: []) if valued else (), ignored=reason)


VERBOSE = Opt(("-v",), front=True)
QUIET = dropped("vzbackup prints little unless asked (-v)")


# --- vzctl -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verb:
    """A vzctl command: the vzbackup verb and its option rules."""

    verb: str
    opts: dict[str, Opt] = field(default_factory=dict)
    command: bool = False  # exec: the words after the CTID are one shell command (vzctl joins)


VZCTL_GLOBAL = {"--verbose": VERBOSE, "-v": VERBOSE, "--quiet": QUIET, "-q": QUIET}
VZCTL: dict[str, Verb] = {
    "create": Verb("create", {
        "--layout": dropped("private areas are directories (or btrfs subvolumes)", valued=True),
        "--diskinodes": dropped("set it with 'vzctl set --diskinodes'", valued=True),
    }),
    "destroy": Verb("destroy"),
    "delete": Verb("destroy"),
    "start": Verb("start", {"--wait": dropped("start returns once init runs"),
                            "--force": dropped("start has no checks to force past")}),
    "stop": Verb("stop"),
    "restart": Verb("restart"),
    "status": Verb("status"),
    "mount": Verb("mount"),
    "umount": Verb("umount"),
    "set": Verb("set", {"--setmode": dropped("settings apply at once or with --save",
                                             valued=True)}),
    "exec": Verb("exec", command=True),
    "exec2": Verb("exec", command=True),
    "enter": Verb("enter"),
    "console": Verb("console"),
    "chkpnt": Verb("chkpnt", {"--dumpfile": same("--dumpfile")}),
    "restore": Verb("restore", {"--dumpfile": same("--dumpfile")}),
    "suspend": Verb("suspend"),
    "resume": Verb("resume"),
}


# --- vzlist, vzdump, vzrestore, vzmigrate --------------------------------------------------------

LIST_FIELDS = {"veid": "ctid", "vpsid": "ctid", "ip_addr": "ip", "numproc": "nproc"}
LIST_WITH_NAME = "ctid,nproc,status,ip,name"  # vzlist -n: the name instead of the hostname


def _list_fields(value: str) -> Tokens:
    return ["-o", ",".join(LIST_FIELDS.get(f, f) for f in value.split(","))]


VZLIST = {
    "-o": Opt(_list_fields), "--output": Opt(_list_fields),
    "-j": Opt(("--json",)), "--json": Opt(("--json",)),
    "-1": Opt(("-H", "-o", "ctid")),
    "-n": Opt(("-o", LIST_WITH_NAME)), "--name": Opt(("-o", LIST_WITH_NAME)),
    "-s": dropped("rows come in CTID order", valued=True),
    "--sort": dropped("rows come in CTID order", valued=True),
}

# vzdump's options: the classic mode flags, --maxfiles, and every valued option of 'dump' (so
# their values are not taken for CTIDs)
VZDUMP = {
    "--suspend": Opt(("--mode", "suspend")),
    "--stop": Opt(("--mode", "stop")),
    "--snapshot": Opt(("--mode", "snapshot")),
    "--maxfiles": Opt(lambda v: ["--prune-backups", f"keep-last={v}"]),
    "--compress": dropped("chunks are always zstd-compressed"),
    "--mailto": dropped("mail comes from the scheduler's notify settings", valued=True),
    "--quiet": QUIET,
    **{o: same(o) for o in ("--mode", "--storage", "--keyfile", "--zstd-level", "--zstd",
                            "--exclude", "--exclude-path", "--bwlimit", "--tmpdir",
                            "--lockwait", "--stopwait", "--script", "--notes-template",
                            "--prune-backups")},
}
DUMPDIR_OPT = "--dumpdir"  # vzdump: where the archive goes (default: the node's DUMPDIR)

VZRESTORE = {o: same(o) for o in ("--storage", "--keyfile", "--ipadd", "--hostname")}

SSH_FLAGS = {"-i": "--ssh-key", "-p": "--ssh-port", "-o": "--ssh-opt"}


def _ssh_options(value: str) -> Tokens:
    """vzmigrate's --ssh="-i KEY -p PORT -o K=V" as vzbackup migrate's options."""
    words, out = shlex.split(value), []
    while words:
        word = words.pop(0)
        flag, glued = word[:2], word[2:]
        if flag not in SSH_FLAGS:
            raise UsageError(f"ssh option {word!r} is not supported",
                             hint="use -i KEY, -p PORT or -o KEY=VALUE")
        if not glued and not words:
            raise UsageError(f"ssh option {flag} needs a value")
        out += [SSH_FLAGS[flag], glued or words.pop(0)]
    return out


VZMIGRATE = {
    "-r": same("--remove-area"), "--remove-area": same("--remove-area"),
    "--live": Opt(("--online",)),
    "--ssh": Opt(_ssh_options),
    "-v": VERBOSE, "--verbose": VERBOSE,
    "-f": dropped("preflight checks what vzmigrate's --nodeps skipped"),
    "--nodeps": dropped("preflight checks what vzmigrate's --nodeps skipped"),
    "--rsync": dropped("rsync's options are vzbackup's (-aHAXS --numeric-ids)", valued=True),
    **{o: same(o) for o in ("--new-id", "--bwlimit", "--sync", "--ssh-key", "--ssh-port",
                            "--ssh-opt")},
}


# --- translation ---------------------------------------------------------------------------------


@dataclass
class Parsed:
    front: Tokens = field(default_factory=list)
    options: Tokens = field(default_factory=list)
    words: Tokens = field(default_factory=list)  # positional arguments
    ordered: Tokens = field(default_factory=list)  # options and words as they came
    values: dict[str, str] = field(default_factory=dict)  # consumed options (--dumpdir)
    notes: list[str] = field(default_factory=list)


def parse(prog: str, argv: Tokens, table: dict[str, Opt], *, keep: tuple[str, ...] = (),
          stop_at_words: int | None = None) -> Parsed:
    """Rewrite *argv*'s options by *table*; options in *keep* are taken out with their value.
    After *stop_at_words* positional words everything is taken as words (a command)."""
    p = Parsed()
    args = list(argv)
    while args:
        arg = args.pop(0)
        if stop_at_words is not None and len(p.words) >= stop_at_words:
            p.words += [arg, *args]
            break
        if not arg.startswith("-") or arg == "-":
            p.words.append(arg)
            p.ordered.append(arg)
            continue
        name, eq, inline = arg.partition("=")
        if name in keep:
            p.values[name] = inline if eq else _value(prog, name, args)
            continue
        opt = table.get(name)
        if opt is None:
            p.options.append(arg)
            p.ordered.append(arg)
            continue
        value = (inline if eq else _value(prog, name, args)) if opt.takes_value else None
        if opt.ignored:
            p.notes.append(f"{prog}: {name} ignored: {opt.ignored}")
        if opt.front:
            p.front += opt.tokens(value)
        else:
            p.options += opt.tokens(value)
            p.ordered += opt.tokens(value)
    return p


def _value(prog: str, name: str, args: Tokens) -> str:
    if not args:
        raise UsageError(f"option {name} needs a value")
    return args.pop(0)


def _vzctl(argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    front = parse("vzctl", argv, VZCTL_GLOBAL, stop_at_words=1)
    if front.options:
        raise UsageError(f"unknown option {front.options[0]}")
    if not front.words:
        raise UsageError("no command given",
                         hint=f"commands: {', '.join(sorted(VZCTL))}")
    cmd, rest = front.words[0], front.words[1:]
    verb = VZCTL.get(cmd)
    if verb is None:
        raise UsageError(f"unknown command {cmd!r}",
                         hint=f"commands: {', '.join(sorted(VZCTL))}")
    if not rest or rest[0].startswith("-"):
        raise UsageError(f"vzctl {cmd}: CTID expected")
    ctid, tail = rest[0], rest[1:]
    if verb.command:
        if not tail:
            raise UsageError(f"vzctl {cmd}: command expected")
        return [[*front.front, verb.verb, ctid, " ".join(tail)]], front.notes
    p = parse("vzctl", tail, verb.opts)  # an option's value stays behind it (p.ordered)
    return [[*front.front, *p.front, verb.verb, ctid, *p.ordered]], front.notes + p.notes


def _vzlist(argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    p = parse("vzlist", argv, VZLIST)
    return [[*p.front, "list", *p.options, *p.words]], p.notes


def _vzdump(argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    p = parse("vzdump", argv, VZDUMP, keep=(DUMPDIR_OPT,))
    everything = "--all" in p.options
    if everything:
        skip = {registry.resolve(node, x) for x in _pairs(p.options, ("--exclude",))[1::2]}
        ctids = [c for c in registry.list_ctids(node) if c not in skip]
    else:
        ctids = [registry.resolve(node, w) for w in p.words]
    if not ctids and not everything:
        raise UsageError("give CTIDs or --all")
    dumpdir = p.values.get(DUMPDIR_OPT) or str(node.dumpdir)
    repo = _pairs(p.options, ("--storage", "--keyfile"))  # export reads where dump wrote
    steps = [[*p.front, "dump", *p.options, *p.words]]
    steps += [["export", str(c), "--dumpdir", dumpdir, *repo] for c in ctids]
    return steps, p.notes


def _pairs(options: Tokens, names: tuple[str, ...]) -> Tokens:
    """The options named *names* with their values, out of translated *options*."""
    return [t for i, t in enumerate(options)
            if t in names or (i and options[i - 1] in names)]


def _vzrestore(argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    p = parse("vzrestore", argv, VZRESTORE)
    if len(p.words) != 2:
        raise UsageError(f"usage: {USAGE['vzrestore']}")
    return [[*p.front, "restore", *p.words, *p.options]], p.notes


def _vzmigrate(argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    p = parse("vzmigrate", argv, VZMIGRATE)
    if len(p.words) != 2:
        raise UsageError(f"usage: {USAGE['vzmigrate']}")
    host, ctid = p.words
    return [[*p.front, "migrate", ctid, host, *p.options]], p.notes


PROGRAMS: dict[str, Callable[[Tokens, Node], tuple[list[Tokens], list[str]]]] = {
    "vzctl": _vzctl,
    "vzlist": _vzlist,
    "vzdump": _vzdump,
    "vzrestore": _vzrestore,
    "vzmigrate": _vzmigrate,
}


USAGE = {
    "vzctl": f"vzctl [--verbose] {{{'|'.join(VZCTL)}}} CTID [options]",
    "vzlist": "vzlist [-a|-S] [-H] [-o FIELD,...] [-1] [-n] [-j] [CTID...]",
    "vzdump": "vzdump [--suspend|--stop|--snapshot] [--dumpdir DIR] [--maxfiles N] CTID...|--all",
    "vzrestore": "vzrestore ARCHIVE CTID [--force]",
    "vzmigrate": "vzmigrate [--online] [-r yes|no] [--keep-dst] [-t] [--ssh=OPTS] HOST CTID",
}


def usage(prog: str) -> str:
    return (f"usage: {USAGE[prog]}\n(vzbackup's classic syntax: each command line runs "
            f"vzbackup verbs; see 'vzbackup --help' and the README)")


def translate(prog: str, argv: Tokens, node: Node) -> tuple[list[Tokens], list[str]]:
    """The vzbackup command lines for the classic command line ``prog argv``, and notes on
    what was ignored."""
    if prog not in PROGRAMS:
        raise UsageError(f"unknown classic command {prog!r}",
                         hint=f"one of {', '.join(PROGRAMS)}")
    return PROGRAMS[prog](argv, node)
