"""``tmtguard learn``: the smallest allowlist that would have permitted what an audit run recorded.

Each recorded action becomes one allowlist entry, scoped to the artifact that needed it (by sha256,
else repo, else path) so that one model's needs never widen what another may do, and commented with
the chains that needed it. What no allowlist can make safe is never proposed: globals that run code
(``posix:system``, ``builtins:exec``), process spawns, network access, dynamic code and file reads
requested while a pickle was being unpickled, shells, secret files, unpinned remote code and tamper
attempts. Those are listed as findings, for a person to look at.

The output is validated with tmtguard's own allowlist parser before it is written.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import time
from dataclasses import dataclass, field

import yaml

from .policy import can_run_code
from .policy.schema import COMMIT, MODULE_PATTERN, PICKLE_REF, SHA256, AllowlistError, parse, parse_net_rule
from .report import Events, describe_chain, describe_frame, read_events  # noqa: F401  (read_events re-exported)

SECTIONS = ("pickle", "imports", "network", "process", "files", "code", "native")

# Loaders whose frame means "a pickle is being unpickled": anything that happens there was asked
# for by the pickle's globals, which is how payloads run.
UNPICKLING_LOADERS = ("pickle.", "_pickle.", "torch.load", "torch.storage", "numpy.load", "joblib.load",
                      "dill.", "cloudpickle.", "unpickler")
SHELLS = frozenset("sh bash dash zsh ksh csh tcsh fish busybox cmd cmd.exe powershell powershell.exe pwsh".split())
SECRET_PATHS = (
    "*/.ssh/*", "*/.aws/*", "*/.azure/*", "*/.config/gcloud/*", "*/.kube/*", "*/.docker/config.json",
    "*/.netrc", "*/.git-credentials", "*/.pgpass", "*/.gnupg/*", "/etc/shadow", "/etc/gshadow", "/etc/sudoers*",
    "/proc/*/environ", "/proc/*/mem", "/proc/*/cmdline", "/var/run/secrets/*", "/run/secrets/*", "*id_rsa*",
    "*id_ed25519*", "*.pem", "*.key",
)


@dataclass
class Entry:
    section: str
    value: object  # a string; for remote_code a (repo, revision) pair
    scope: tuple | None  # ("sha256", hex) | ("repo", name) | ("path", path) | None (every artifact)
    scope_label: str | None = None
    chains: dict = field(default_factory=dict)  # chain description -> count
    note: str | None = None
    files: dict = field(default_factory=dict)  # remote_code: file name -> sha256
    outermost: set = field(default_factory=set)  # the outermost artifacts whose loads needed it


@dataclass
class Finding:
    action: str
    target: str
    reason: str
    chains: dict = field(default_factory=dict)
    decisions: dict = field(default_factory=dict)
    outermost: set = field(default_factory=set)


@dataclass
class Proposal:
    entries: dict = field(default_factory=dict)  # (scope, section, value) -> Entry
    findings: dict = field(default_factory=dict)  # (action, target, reason) -> Finding
    events: int = 0
    skipped: int = 0


class _Refuse(Exception):
    """An action that must become a finding, with the reason."""


def propose(events: Events) -> Proposal:
    proposal = Proposal(events=len(events.records), skipped=events.skipped)
    inexpressible: dict = {}  # (scope, section, value) -> reason, so each is parsed once
    for rec in events.records:
        chain = [f for f in rec.get("chain") or [] if isinstance(f, dict)]
        action, target = str(rec.get("action")), str(rec.get("target"))
        label = describe_chain(chain)
        outer = describe_frame(chain[0]) if chain else None
        try:
            section, value, note = _entry_for(action, target, rec, chain)
            scope, scope_label = (None, None) if section == "remote_code" else _scope(chain)
            key = (scope, section, value)
            if key in inexpressible:
                raise _Refuse(inexpressible[key])
            if key not in proposal.entries:
                try:
                    _validate(section, value, scope)
                except _Refuse as why:
                    inexpressible[key] = str(why)
                    raise
                proposal.entries[key] = Entry(section, value, scope, scope_label, note=note)
        except _Refuse as why:
            f = proposal.findings.setdefault((action, target, str(why)), Finding(action, target, str(why)))
            f.chains[label] = f.chains.get(label, 0) + 1
            f.outermost.add(outer)
            verdict = rec.get("decision") or "?"
            f.decisions[verdict] = f.decisions.get(verdict, 0) + 1
            continue
        e = proposal.entries[key]
        e.chains[label] = e.chains.get(label, 0) + 1
        e.outermost.add(outer)
        if section == "remote_code":
            digest = _remote_file(rec, target)
            if digest:
                e.files[digest[0]] = digest[1]
    _drop_covered(proposal)
    return proposal


# --- one action -> one entry, or a finding --------------------------------------------------------


def _by_pickle(chain) -> bool:
    return bool(chain) and str(chain[-1].get("loader") or "").startswith(UNPICKLING_LOADERS)


def _entry_for(action: str, target: str, rec: dict, chain: list):
    """(section, value, note) for a recorded action; raises _Refuse when it must not be allowed."""
    detail = rec.get("detail") if isinstance(rec.get("detail"), dict) else {}
    if action == "pickle.global":
        m = PICKLE_REF.match(target)
        if not m:
            raise _Refuse("not a module:qualname pair")
        if can_run_code(m.group(1), m.group(2)):
            raise _Refuse("this global can run code or reach the outside world when a pickle calls it; "
                          "no allowlist entry can make that safe")
        return "pickle", target, None
    if action == "import":
        if not MODULE_PATTERN.match(target) or target.endswith(".*"):
            raise _Refuse("not a module name")
        return "imports", target, None
    if action in ("network.connect", "network.send", "network.resolve"):
        if _by_pickle(chain):
            raise _Refuse("network access requested by a pickle while it was being unpickled")
        port = detail.get("port")
        if action == "network.resolve" and isinstance(port, int) and ":" not in target:
            target = f"{target}:{port}"  # the lookup named the port it was for
        return _network_entry(action, target)
    if action == "process.spawn":
        if _by_pickle(chain):
            raise _Refuse("a process spawn requested by a pickle is how pickle payloads run commands")
        executable = str(detail.get("executable") or (target.split() or [target])[0])
        if os.path.basename(executable).lower() in SHELLS:
            raise _Refuse("a shell runs whatever command it is given; allow the programs it runs instead")
        return "process", executable, None
    if action == "code.exec":
        if _by_pickle(chain):
            raise _Refuse("code generated while a pickle was being unpickled is a pickle payload")
        if not MODULE_PATTERN.match(target) or target.split(".")[0] in ("builtins", "__builtin__", "__main__"):
            raise _Refuse("dynamic code from no identifiable module cannot be scoped; review the code that ran it")
        return "code", target, None
    if action == "native.load":
        if _by_pickle(chain):
            raise _Refuse("a native library loaded while a pickle was being unpickled is a pickle payload")
        if target in ("", "None", "<process>", "libc") or target.startswith("<"):
            raise _Refuse("looking symbols up in the process itself (ctypes.CDLL(None)) reaches every libc function")
        return "native", target, None
    if action in ("file.open", "file.write"):
        if _by_pickle(chain):
            raise _Refuse("a file opened by a pickle while it was being unpickled")
        path = str(detail.get("path") or target)
        if detail.get("secret") or any(fnmatch.fnmatchcase(path, p) for p in SECRET_PATHS):
            raise _Refuse("a credentials or secrets file; a model never needs it")
        return "files", path, None
    if action == "remote_code.load":
        if "copy_sha256" in detail or "copy" in detail:
            raise _Refuse("the modules-cache copy that would run differs from the snapshot: it was modified")
        repo, revision = _remote_repo(rec, target, chain)
        if not repo:
            raise _Refuse("the event names no repo; run `tmtguard pin` on the model instead")
        if not revision or not COMMIT.match(revision):
            raise _Refuse("remote code not pinned to a 40-hex commit; a branch or tag can change under you")
        return "remote_code", (repo, revision), None
    if action == "guard.tamper":
        raise _Refuse("an attempt to switch tmtguard off or loosen it from inside a load or model code")
    raise _Refuse(f"an action this version of tmtguard learn does not know ({action}); review it by hand")


def _network_entry(action: str, target: str):
    try:
        parse_net_rule(target)
        return "network", target, None
    except ValueError:
        pass
    host = target.strip()
    if action == "network.resolve" and host and ":" not in host.strip("[]"):
        return "network", f"{host}:*", "a lookup names no port: narrow it to the port the model connects to"
    if host.count(":") > 1 and not host.startswith("["):  # bare IPv6 address with a port
        addr, _, port = host.rpartition(":")
        candidate = f"[{addr}]:{port}"
        try:
            parse_net_rule(candidate)
            return "network", candidate, None
        except ValueError:
            pass
    raise _Refuse("not a host:port this tmtguard can write a rule for")


def _remote_repo(rec: dict, target: str, chain: list):
    detail = rec.get("detail") if isinstance(rec.get("detail"), dict) else {}
    repo, revision = detail.get("repo"), detail.get("revision")
    m = re.match(r"^(?P<repo>[^@\s]+)@(?P<rev>[0-9a-f]{40})(?:/.*)?$", target)
    if m:
        repo, revision = repo or m.group("repo"), revision or m.group("rev")
    if (not repo or not revision) and chain:
        repo, revision = repo or chain[-1].get("repo"), revision or chain[-1].get("revision")
    return repo, revision


def _remote_file(rec: dict, target: str):
    detail = rec.get("detail") if isinstance(rec.get("detail"), dict) else {}
    name = detail.get("file") or (target.split("/", 2)[-1] if re.match(r"^[^@]+@[0-9a-f]{40}/.+", target) else None)
    digest = SHA256.match(str(detail.get("sha256") or ""))
    return (str(name), digest.group(1).lower()) if name and digest else None


def _scope(chain: list):
    if not chain:
        return None, None
    inner = chain[-1]
    label = describe_frame(inner)
    digest = SHA256.match(str(inner.get("sha256") or ""))
    if digest:
        return ("sha256", digest.group(1).lower()), label
    if inner.get("repo"):
        return ("repo", str(inner["repo"])), label
    artifact = str(inner.get("artifact") or "")
    if os.path.isabs(artifact):
        return ("path", artifact), label
    return None, label


def _validate(section: str, value, scope) -> None:
    """Each entry is parsed on its own first, so one inexpressible action becomes a finding instead of
    an invalid file (for example an action whose section this tmtguard version does not have)."""
    probe = Proposal()
    probe.entries[(scope, section, value)] = Entry(section, value, scope)
    try:
        render(probe, sources=())
    except AllowlistError as exc:
        raise _Refuse(f"cannot be written as an allowlist entry: {str(exc).split(': ', 1)[-1]}") from None


def _drop_covered(proposal: Proposal) -> None:
    """Smallest: a scoped entry that a global one already covers goes, and a lookup's ``host:*`` goes
    when the same scope already connects to that host on a named port."""
    entries = proposal.entries
    for key in list(entries):
        scope, section, value = key
        if scope is not None and (None, section, value) in entries:
            _merge_into(entries[(None, section, value)], entries.pop(key))
    for key in list(entries):
        scope, section, value = key
        if section == "network" and isinstance(value, str) and value.endswith(":*") and entries[key].note:
            host = value[:-2]
            other = next((k for k in entries if k[0] == scope and k[1] == "network" and k != key
                          and isinstance(k[2], str) and k[2].rpartition(":")[0] == host), None)
            if other is not None:
                _merge_into(entries[other], entries.pop(key))


def _merge_into(into: Entry, other: Entry) -> None:
    for chain, n in other.chains.items():
        into.chains[chain] = into.chains.get(chain, 0) + n
    into.outermost |= other.outermost


def _suspect(proposal: Proposal) -> set:
    """Outermost artifacts that also attempted something listed as a finding."""
    return {o for f in proposal.findings.values() for o in f.outermost if o is not None}


# --- rendering ----------------------------------------------------------------------------------


def _scalar(value: str) -> str:
    if re.match(r"^[A-Za-z0-9_/.][A-Za-z0-9_./:@+-]*$", value) and not value.endswith(":"):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)


def _comment(text: str) -> str:
    return " ".join(str(text).split())


def _entry_lines(e: Entry, indent: str, suspect: set = frozenset()) -> list:
    lines = []
    for outer in sorted(e.outermost & suspect):
        lines.append(f"{indent}# WARNING: {_comment(outer)} also attempted what is listed under Findings below")
    for chain, n in sorted(e.chains.items(), key=lambda i: -i[1]):
        lines.append(f"{indent}# needed by: {_comment(chain)}" + (f"  (x{n})" if n > 1 else ""))
    if e.note:
        lines.append(f"{indent}# note: {_comment(e.note)}")
    lines.append(f"{indent}- {_scalar(str(e.value))}")
    return lines


def _section_lines(entries: list, indent: str, suspect: set = frozenset()) -> list:
    lines = []
    for section in SECTIONS:
        chosen = sorted((e for e in entries if e.section == section), key=lambda e: str(e.value))
        if chosen:
            lines += [f"{indent}{section}:", f"{indent}  allow:"]
            for e in chosen:
                lines += _entry_lines(e, indent + "    ", suspect)
    return lines


def render(proposal: Proposal, sources=()) -> str:
    entries = list(proposal.entries.values())
    suspect = _suspect(proposal)
    lines = []
    if sources:
        lines += [
            f"# Proposed by `tmtguard learn` on {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from "
            f"{', '.join(map(str, sources))}",
            f"# ({proposal.events} events" + (f", {proposal.skipped} lines skipped" if proposal.skipped else "") + ").",
            "# Review every entry before enforcing: it permits exactly what the audited run did, no more.",
        ]
    lines.append("version: 1")
    lines += _section_lines([e for e in entries if e.scope is None and e.section != "remote_code"], "", suspect)
    remote = sorted((e for e in entries if e.section == "remote_code"), key=lambda e: e.value)
    if remote:
        lines += ["remote_code:", "  allow:"]
        for e in remote:
            repo, revision = e.value
            lines += [f"    # needed by: {_comment(c)}" for c in e.chains]
            lines += [f"    - repo: {_scalar(repo)}", f"      revision: {_scalar(revision)}"]
            if e.files:
                lines.append("      files:")
                lines += [f"        {_scalar(n)}: sha256:{d}" for n, d in sorted(e.files.items())]
    scopes: dict = {}
    for e in entries:
        if e.scope is not None and e.section != "remote_code":
            scopes.setdefault(e.scope, []).append(e)
    if scopes:
        lines.append("artifacts:")
        for (kind, value), group in sorted(scopes.items()):
            label = next((e.scope_label for e in group if e.scope_label), None)
            lines.append(f"  - match: {{{kind}: {_scalar(value)}}}" + (f"  # {_comment(label)}" if label else ""))
            lines += _section_lines(group, "    ", suspect)
    if proposal.findings:
        lines += ["", "# Findings: recorded actions this file does NOT permit, because no allowlist can make them safe.",
                  "# Find out why the artifact attempted them before going further."]
        for f in proposal.findings.values():
            verdicts = ", ".join(f"{k} x{n}" for k, n in sorted(f.decisions.items()))
            lines.append(f"#   - {f.action} {_comment(f.target)} ({verdicts}): {_comment(f.reason)}")
            lines += [f"#       chain: {_comment(c)}" for c in f.chains]
    text = "\n".join(lines) + "\n"
    parse(text, "<tmtguard learn output>")  # never hand out a file tmtguard itself would refuse
    return text


def summary(proposal: Proposal, output: str | None) -> str:
    n = len(proposal.entries)
    where = output or "standard output"
    lines = [f"tmtguard learn: {proposal.events} events -> {n} allowlist entr{'y' if n == 1 else 'ies'} ({where})"]
    if proposal.findings:
        lines.append(f"tmtguard learn: {len(proposal.findings)} finding(s) NOT allowed (no allowlist can make them safe):")
        for f in proposal.findings.values():
            lines.append(f"  {f.action} {f.target}: {f.reason}")
            lines += [f"      chain: {c}" for c in f.chains]
    return "\n".join(lines)
