"""``tmtguard report``: what each dependency attempted, from one or more events files.

Events are grouped by the outermost artifact (the file the application asked to load), then by the
nested chain that acted inside it, then by (action, target): how often, blocked or audited, first
and last seen, and which code asked. Reading is tolerant: a line that is not an event (a truncated
last line after a crash, a stray message) is counted and skipped, never fatal.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

NO_LOAD = "(no guarded load: application code)"


@dataclass
class Events:
    records: list = field(default_factory=list)
    skipped: int = 0  # lines that were not event objects
    files: tuple = ()


def read_events(paths) -> Events:
    """Every event in ``paths`` (JSON lines, as TMTGUARD_EVENTS writes them), in file order."""
    out = Events(files=tuple(paths))
    for path in paths:
        with open(path, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    out.skipped += 1
                    continue
                if not isinstance(rec, dict) or "action" not in rec or "target" not in rec:
                    out.skipped += 1
                    continue
                rec.setdefault("chain", [])
                out.records.append(rec)
    return out


def iso(t) -> str | None:
    if not isinstance(t, (int, float)):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def frame_key(f: dict) -> tuple:
    return (f.get("loader"), f.get("artifact"), f.get("sha256"), f.get("repo"), f.get("revision"))


def describe_frame(f: dict) -> str:
    digest = f.get("sha256")
    where = f.get("repo") and f"{f['repo']}@{(f.get('revision') or '?')[:12]}"
    label = f.get("artifact") or "?"
    return f"{f.get('loader') or '?'}({label}" + (f" {where}" if where and where not in label else "") + \
        (f" sha256={digest[:12]}…" if digest else "") + ")"


def describe_chain(chain: list) -> str:
    return " -> ".join(describe_frame(f) for f in chain) if chain else NO_LOAD


def describe_origin(o) -> str | None:
    if not isinstance(o, dict):
        return None
    dist = o.get("distribution") or {}
    who = f"{dist.get('name')} {dist.get('version') or ''}".strip() if dist.get("name") else None
    where = f"{o.get('module') or '?'} ({o.get('file')}:{o.get('line')})"
    return f"{who}: {where}" if who else where


class _Tally:
    __slots__ = ("count", "first", "last", "decisions")

    def __init__(self):
        self.count = 0
        self.first = self.last = None
        self.decisions: dict = {}

    def add(self, rec: dict) -> None:
        self.count += 1
        t = rec.get("time")
        if isinstance(t, (int, float)):
            self.first = t if self.first is None else min(self.first, t)
            self.last = t if self.last is None else max(self.last, t)
        verdict = rec.get("decision") or "?"
        self.decisions[verdict] = self.decisions.get(verdict, 0) + 1

    def as_dict(self) -> dict:
        return {"count": self.count, "decisions": dict(sorted(self.decisions.items())),
                "first": self.first, "last": self.last, "first_iso": iso(self.first), "last_iso": iso(self.last)}


def summarize(events: Events) -> dict:
    """The report as plain data (what ``--format json`` prints)."""
    total = _Tally()
    pids = set()
    artifacts: dict = {}  # outermost frame key -> (tally, frame, {chain key -> (tally, chain, {attempt key -> ...})})
    for rec in events.records:
        total.add(rec)
        pids.add(rec.get("pid"))
        chain = [f for f in rec.get("chain") or [] if isinstance(f, dict)]
        outer = chain[0] if chain else None
        a_key = frame_key(outer) if outer else None
        a_tally, _, chains = artifacts.setdefault(a_key, (_Tally(), outer, {}))
        a_tally.add(rec)
        c_key = tuple(frame_key(f) for f in chain)
        c_tally, _, attempts = chains.setdefault(c_key, (_Tally(), chain, {}))
        c_tally.add(rec)
        t_key = (rec.get("action"), str(rec.get("target")))
        t_tally, _, origins = attempts.setdefault(t_key, (_Tally(), rec, {}))
        t_tally.add(rec)
        o = describe_origin(rec.get("origin"))
        if o:
            origins[o] = origins.get(o, 0) + 1

    def blocked_first(item):
        tally = item[1][0]
        return (-tally.decisions.get("blocked", 0), -tally.count)

    out_artifacts = []
    for a_key, (a_tally, outer, chains) in sorted(artifacts.items(), key=blocked_first):
        out_chains = []
        for c_key, (c_tally, chain, attempts) in sorted(chains.items(), key=lambda i: (len(i[0]), blocked_first(i))):
            out_chains.append({
                "chain": chain, "depth": len(chain), **c_tally.as_dict(),
                "attempts": [
                    {"action": action, "target": target, "rule": first.get("rule"), **t_tally.as_dict(),
                     "origins": [{"origin": o, "count": n} for o, n in sorted(origins.items(), key=lambda i: -i[1])]}
                    for (action, target), (t_tally, first, origins) in sorted(attempts.items(), key=blocked_first)
                ],
            })
        out_artifacts.append({
            "artifact": outer.get("artifact") if outer else None,
            "loader": outer.get("loader") if outer else None,
            "sha256": outer.get("sha256") if outer else None,
            **({"repo": outer["repo"]} if outer and outer.get("repo") else {}),
            **a_tally.as_dict(), "chains": out_chains,
        })
    return {
        "files": list(events.files), "events": total.count, "skipped_lines": events.skipped,
        "processes": len(pids), **{k: v for k, v in total.as_dict().items() if k != "count"},
        "artifacts": out_artifacts,
    }


def render_text(summary: dict) -> str:
    d = summary["decisions"]
    lines = [
        f"tmtguard report: {summary['events']} events ("
        + ", ".join(f"{n} {k}" for k, n in d.items()) + f") from {summary['processes']} process(es)"
        + (f", {summary['first_iso']} .. {summary['last_iso']}" if summary["first_iso"] else ""),
    ]
    if summary["skipped_lines"]:
        lines.append(f"({summary['skipped_lines']} line(s) skipped: not tmtguard events)")
    if not summary["artifacts"]:
        lines.append("nothing was blocked or audited")
    for art in summary["artifacts"]:
        head = art["artifact"] or NO_LOAD
        if art["sha256"]:
            head += f"  sha256={art['sha256']}"
        lines += ["", f"{head}", f"  {art['count']} event(s), {_verdicts(art)}; first {art['first_iso']}, last {art['last_iso']}"]
        for ch in art["chains"]:
            lines.append(f"  chain: {describe_chain(ch['chain'])}")
            for at in ch["attempts"]:
                lines.append(f"    {at['action']:<16} {at['target']:<40} {_verdicts(at):<22} "
                             f"first {at['first_iso']}  last {at['last_iso']}")
                for o in at["origins"][:3]:
                    lines.append(f"        by {o['origin']}" + (f" (x{o['count']})" if o["count"] > 1 else ""))
    return "\n".join(lines)


def _verdicts(t: dict) -> str:
    return ", ".join(f"{k} x{n}" for k, n in t["decisions"].items())
