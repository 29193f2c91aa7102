"""Allowlist files, version 1: YAML in, validated rules out, every error naming file, line and key.

The YAML is composed to nodes (not constructed to Python objects) so that every value keeps its
line, duplicate keys are caught (PyYAML silently keeps the last one), and no YAML tag can build an
object: an allowlist is data and nothing else.
"""
from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field

import yaml

from ..config import ConfigError

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
PICKLE_REF = re.compile(rf"^({_DOTTED}):({_DOTTED})$")
MODULE_PATTERN = re.compile(rf"^{_DOTTED}(?:\.\*)?$")
SHA256 = re.compile(r"^(?:sha256:)?([0-9a-fA-F]{64})$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class AllowlistError(ConfigError):
    """An allowlist file tmtguard cannot use: unreadable, malformed, or not version 1."""


@dataclass(frozen=True)
class Source:
    """Where a rule came from, so a decision can say which line allowed it."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class NetRule:
    """One ``network.allow`` entry. ``port`` is None for ``*``."""

    text: str
    kind: str  # "host" | "suffix" | "cidr" | "unix" | "any"
    value: object
    port: int | None

    def matches(self, host: str, port: int | None) -> bool:
        if self.kind == "unix":
            return port is None and host == self.value
        if port is None or (self.port is not None and port != self.port):
            return False
        return self.matches_host(host)

    def matches_host(self, host: str) -> bool:
        """True when the rule names ``host`` on some port: what a name lookup that names no port
        needs. A name matches name rules only, an address matches CIDR rules only (an IPv4-mapped
        IPv6 address also matches the IPv4 rule); ``unix:`` rules never match a host."""
        if self.kind == "any":
            return True
        if self.kind == "host":
            return host_key(host) == self.value
        if self.kind == "suffix":
            h = host_key(host)
            return h.endswith(self.value) and len(h) > len(self.value)
        if self.kind != "cidr":
            return False
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if ip in self.value:
            return True
        mapped = getattr(ip, "ipv4_mapped", None)
        return mapped is not None and mapped in self.value


def host_key(host: str) -> str:
    """A host name as rules compare it: lower case, no trailing dot, IDNA (punycode) for non-ASCII."""
    h = host.lower().rstrip(".")
    if not h.isascii():
        try:
            h = ".".join(label.encode("idna").decode("ascii") if label else "" for label in h.split("."))
        except UnicodeError:
            pass
    return h


_HOST_NAME = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*$")


@dataclass(frozen=True)
class RemoteCodeRule:
    repo: str
    revision: str
    files: tuple[tuple[str, str], ...]  # (file name, lower-case hex sha256)
    source: Source
    # {normalized file name: sha256}, what a code file is matched against (built once, not per match)
    pinned: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "pinned", {posixpath.normpath(n): d for n, d in self.files})


@dataclass
class Section:
    """The permissions one layer grants; each allow entry keeps its source line."""

    pickle: dict = field(default_factory=dict)  # (module, qualname) -> Source
    imports: dict = field(default_factory=dict)  # "pkg" or "pkg.*" -> Source
    network: dict = field(default_factory=dict)  # NetRule -> Source
    process: dict = field(default_factory=dict)  # executable -> Source
    files: dict = field(default_factory=dict)  # path or glob -> Source
    code: dict = field(default_factory=dict)  # module pattern allowed to generate code -> Source
    native: dict = field(default_factory=dict)  # library, library:symbol, <process>, <subinterpreter> -> Source
    network_process_wide: bool | None = None


@dataclass(frozen=True)
class ArtifactMatch:
    sha256: str | None = None
    path: str | None = None
    repo: str | None = None

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in (("sha256", self.sha256), ("path", self.path), ("repo", self.repo)) if v)


@dataclass
class Scoped:
    match: ArtifactMatch
    section: Section
    source: Source


@dataclass
class AllowlistFile:
    path: str
    base: Section
    scoped: list
    remote_code: list


# --- parsing helpers -------------------------------------------------------------------------


class _Ctx:
    def __init__(self, path: str):
        self.path = path

    def fail(self, node, message: str):
        line = node.start_mark.line + 1 if node is not None else 1
        raise AllowlistError(f"{self.path}:{line}: {message}")

    def src(self, node) -> Source:
        return Source(self.path, node.start_mark.line + 1)


def _mapping(ctx: _Ctx, node, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(node, yaml.MappingNode):
        ctx.fail(node, f"'{where}' must be a mapping (key: value), not {_kind(node)}")
    out: dict = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            ctx.fail(key_node, f"keys under '{where}' must be plain names")
        key = key_node.value
        if key in out:
            ctx.fail(key_node, f"duplicate key '{key}' under '{where}' (first at line {out[key][0].start_mark.line + 1})")
        if key not in allowed:
            ctx.fail(key_node, f"unknown key '{key}' under '{where}'; expected one of: {', '.join(allowed)}")
        out[key] = (key_node, value_node)
    return out


def _kind(node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node is None:
        return "nothing"
    return f"the value {node.value!r}"


def _strings(ctx: _Ctx, node, where: str) -> list:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
        return []
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, f"'{where}' must be a list of strings, not {_kind(node)}")
    out = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or item.tag not in ("tag:yaml.org,2002:str",) or not item.value.strip():
            ctx.fail(item, f"every entry of '{where}' must be a non-empty string, not {_kind(item)}")
        out.append((item.value.strip(), item))
    return out


def _bool(ctx: _Ctx, node, where: str) -> bool:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
        return node.value.lower() in ("true", "yes", "on")
    ctx.fail(node, f"'{where}' must be true or false, not {_kind(node)}")


def parse_net_rule(text: str) -> NetRule:
    """``host:port``, ``host:*``, ``*.domain:port``, ``10.0.0.0/8:*``, ``[::1]:port``, ``[fd00::/8]:*``,
    ``unix:/path``, ``*:*``. Raises ValueError with the reason."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/") and not path.startswith("@"):
            raise ValueError("a unix rule names an absolute path (unix:/run/x.sock) or an abstract name (unix:@name)")
        return NetRule(text, "unix", path, None)
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError("an IPv6 rule is written [address]:port or [prefix/len]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError("a network rule is host:port, host:*, *.domain:port, CIDR:port, [v6]:port or unix:/path")
        if ":" in host:
            raise ValueError("write an IPv6 address or network in brackets: [::1]:8080, [fd00::/8]:*")
    if port_text == "*":
        port = None
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise ValueError(f"port {port_text!r} is not a number from 1 to 65535 or *")
    if host == "*":
        return NetRule(text, "any", None, port)
    if host.startswith("*."):
        suffix = host[1:].lower()
        if "*" in suffix or len(suffix) < 2:
            raise ValueError("a wildcard host is written *.domain")
        if not _HOST_NAME.match(host_key(suffix[1:])):
            raise ValueError(f"{suffix[1:]!r} is not a host name")
        return NetRule(text, "suffix", "." + host_key(suffix[1:]), port)
    if "*" in host:
        raise ValueError("'*' may only stand alone or lead a domain (*.example.com)")
    try:
        if "/" in host:
            return NetRule(text, "cidr", ipaddress.ip_network(host, strict=False), port)
        return NetRule(text, "cidr", ipaddress.ip_network(host), port)
    except ValueError:
        if "/" in host or ":" in host:
            raise ValueError(f"{host!r} is not an IP address or network") from None
    if not _HOST_NAME.match(host_key(host)):
        raise ValueError(f"{host!r} is not a host name, IP address or network")
    return NetRule(text, "host", host_key(host), port)


_SECTION_KEYS = ("pickle", "imports", "network", "process", "files", "code", "native")


def _section(ctx: _Ctx, items: dict, where: str) -> Section:
    section = Section()
    for key in _SECTION_KEYS:
        if key not in items:
            continue
        _, node = items[key]
        name = f"{where}{key}"
        sub = _mapping(ctx, node, name, ("allow", "process_wide") if key == "network" else ("allow",))
        if key == "network" and "process_wide" in sub:
            section.network_process_wide = _bool(ctx, sub["process_wide"][1], f"{name}.process_wide")
        if "allow" not in sub:
            continue
        for text, item in _strings(ctx, sub["allow"][1], f"{name}.allow"):
            source = ctx.src(item)
            if key == "pickle":
                m = PICKLE_REF.match(text)
                if not m:
                    ctx.fail(item, f"'{text}' in {name}.allow is not module:qualname (for example collections:OrderedDict)")
                section.pickle[(m.group(1), m.group(2))] = source
            elif key in ("imports", "code"):
                if not MODULE_PATTERN.match(text):
                    ctx.fail(item, f"'{text}' in {name}.allow is not a module name or pkg.*")
                getattr(section, key)[text] = source
            elif key == "network":
                try:
                    section.network[parse_net_rule(text)] = source
                except ValueError as exc:
                    ctx.fail(item, f"'{text}' in {name}.allow: {exc}")
            elif key == "process":
                section.process[text] = source
            elif key == "files":
                section.files[text] = source
            elif key == "native":
                section.native[text] = source
    return section


def parse(text: str, path: str) -> AllowlistFile:
    """Validate one allowlist document. Raises AllowlistError naming file, line and key."""
    ctx = _Ctx(path)
    try:
        root = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise AllowlistError(f"{path}{line}: not valid YAML: {problem}") from None
    if root is None:
        raise AllowlistError(f"{path}: empty allowlist; it needs at least 'version: 1'")
    _plain_tags_only(ctx, root)
    top = _mapping(ctx, root, "<top level>", ("version",) + _SECTION_KEYS + ("remote_code", "artifacts"))
    if "version" not in top:
        ctx.fail(root, "missing 'version: 1'")
    vnode = top["version"][1]
    if not (isinstance(vnode, yaml.ScalarNode) and vnode.tag == "tag:yaml.org,2002:int" and vnode.value == "1"):
        ctx.fail(vnode, f"'version' must be 1 (the only allowlist format this tmtguard reads), not {_kind(vnode)}")
    base = _section(ctx, top, "")
    remote: list = []
    if "remote_code" in top:
        rc = _mapping(ctx, top["remote_code"][1], "remote_code", ("allow",))
        if "allow" in rc:
            remote = _remote_code(ctx, rc["allow"][1])
    scoped: list = []
    if "artifacts" in top:
        node = top["artifacts"][1]
        if not isinstance(node, yaml.SequenceNode):
            ctx.fail(node, f"'artifacts' must be a list of scoped rules, not {_kind(node)}")
        for i, entry in enumerate(node.value):
            where = f"artifacts[{i}]"
            items = _mapping(ctx, entry, where, ("match",) + _SECTION_KEYS)
            if "match" not in items:
                ctx.fail(entry, f"{where} needs 'match:' with sha256, path or repo")
            m = _mapping(ctx, items["match"][1], f"{where}.match", ("sha256", "path", "repo"))
            if not m:
                ctx.fail(items["match"][1], f"{where}.match needs at least one of sha256, path, repo")
            values = {}
            for k, (_, vnode) in m.items():
                if not isinstance(vnode, yaml.ScalarNode) or not vnode.value.strip():
                    ctx.fail(vnode, f"{where}.match.{k} must be a string")
                values[k] = vnode.value.strip()
            if "sha256" in values:
                d = SHA256.match(values["sha256"])
                if not d:
                    ctx.fail(m["sha256"][1], f"{where}.match.sha256 must be 64 hex digits (optionally sha256:...)")
                values["sha256"] = d.group(1).lower()
            scoped.append(Scoped(ArtifactMatch(**values), _section(ctx, items, f"{where}."), ctx.src(entry)))
    return AllowlistFile(path, base, scoped, remote)


_PLAIN_TAGS = frozenset("tag:yaml.org,2002:" + t for t in ("map", "seq", "str", "int", "bool", "null", "float"))


def _plain_tags_only(ctx: _Ctx, node) -> None:
    """An allowlist is plain data: a YAML tag (!!python/object...) is refused wherever it stands."""
    todo = [node]
    seen: set = set()  # anchors and aliases share nodes: a recursive alias (&a [*a]) is a cycle
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.tag not in _PLAIN_TAGS:
            ctx.fail(n, f"YAML tag {n.tag!r} is not allowed in an allowlist (plain data only)")
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                todo.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            todo.extend(n.value)


def _remote_code(ctx: _Ctx, node) -> list:
    if not isinstance(node, yaml.SequenceNode):
        ctx.fail(node, f"'remote_code.allow' must be a list of {{repo, revision, files}}, not {_kind(node)}")
    rules = []
    for i, entry in enumerate(node.value):
        where = f"remote_code.allow[{i}]"
        items = _mapping(ctx, entry, where, ("repo", "revision", "files"))
        for required in ("repo", "revision"):
            if required not in items:
                ctx.fail(entry, f"{where} needs '{required}'")
        repo = items["repo"][1]
        rev = items["revision"][1]
        if not isinstance(repo, yaml.ScalarNode) or not repo.value.strip():
            ctx.fail(repo, f"{where}.repo must be a repo id (org/name) or a local folder")
        if not isinstance(rev, yaml.ScalarNode) or not COMMIT.match(rev.value):
            ctx.fail(rev, f"{where}.revision must be a 40-hex commit id; a branch or tag never matches")
        files: list = []
        if "files" in items:
            fnode = items["files"][1]
            if not isinstance(fnode, yaml.MappingNode):
                ctx.fail(fnode, f"{where}.files must map file names to sha256:<hex>")
            seen = set()
            for k, v in fnode.value:
                if not isinstance(k, yaml.ScalarNode):
                    ctx.fail(k, f"{where}.files must map file names to sha256:<hex>, not {_kind(k)} to a digest")
                if k.value in seen:
                    ctx.fail(k, f"duplicate file '{k.value}' in {where}.files")
                seen.add(k.value)
                d = SHA256.match(v.value) if isinstance(v, yaml.ScalarNode) else None
                if not d or not v.value.startswith("sha256:"):
                    ctx.fail(v, f"{where}.files.{k.value} must be sha256:<64 hex digits>")
                files.append((k.value, d.group(1).lower()))
        rules.append(RemoteCodeRule(repo.value.strip(), rev.value, tuple(files), ctx.src(entry)))
    return rules


def load_file(path: str) -> AllowlistFile:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise AllowlistError(f"{path}: cannot read allowlist: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AllowlistError(f"{path}: allowlist is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse(text, path)
