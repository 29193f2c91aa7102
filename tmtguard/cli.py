"""The ``tmtguard`` command. Each subcommand is a small function; the guard itself is not
activated for the command's own process unless the subcommand needs it (``demo``)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _check(args) -> int:
    from .policy import AllowlistError, Policy

    try:
        policy = Policy.from_files(args.files, builtins=not args.no_builtins)
    except AllowlistError as exc:
        print(f"tmtguard check: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(effective(policy), indent=2) if args.format == "json" else render_yaml(policy))
    from .guards import _audit

    hook = "C (tmtguard._auditfast)" if _audit.native else "Python (the C extension was not built)"
    print(f"# ok: {len(args.files)} file(s) valid; {len(policy.files)} layer(s) merged; audit hook: {hook}",
          file=sys.stderr)
    return 0


def effective(policy) -> dict:
    base = policy.base
    out = {
        "version": 1,
        "pickle": {"allow": sorted(f"{m}:{q}" for m, q in base.pickle)},
        "imports": {"allow": sorted(base.imports)},
        "network": {"allow": sorted(r.text for r in base.network)},
        "process": {"allow": sorted(base.process)},
        "files": {"allow": sorted(base.files)},
        "code": {"allow": sorted(base.code)},
        "native": {"allow": sorted(base.native)},
        "remote_code": {"allow": [
            {"repo": r.repo, "revision": r.revision, **({"files": {n: f"sha256:{d}" for n, d in r.files}} if r.files else {})}
            for r in policy.remote_code]},
        "artifacts": [
            {"match": {k: v for k, v in (("sha256", s.match.sha256), ("path", s.match.path), ("repo", s.match.repo)) if v},
             **{name: {"allow": sorted(_entries(s.section, name))} for name in ("pickle", "imports", "network", "process", "files", "code", "native") if _entries(s.section, name)}}
            for s in policy.scoped
        ],
    }
    if base.network_process_wide:
        out["network"]["process_wide"] = True
    return out


def _entries(section, name):
    table = getattr(section, name)
    if name == "pickle":
        return [f"{m}:{q}" for m, q in table]
    if name == "network":
        return [r.text for r in table]
    return list(table)


def render_yaml(policy) -> str:
    import yaml

    header = "# effective tmtguard policy, merged from:\n" + "".join(f"#   {p}\n" for p in policy.files)
    return header + yaml.safe_dump(effective(policy), sort_keys=False, default_flow_style=False)


def _demo(args) -> int:
    from . import demo

    return demo.main(keep=args.keep)


def _run(args) -> int:
    from . import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("tmtguard run: name the command to run after --, e.g. tmtguard run -- python app.py", file=sys.stderr)
        return 2
    env = launch.child_environment(os.environ, mode=args.mode, allowlists=args.allowlist, events=args.events,
                                   otel_exporter=args.otel_exporter)
    return launch.run(command, env)


def _report(args) -> int:
    from . import report

    try:
        summary = report.summarize(report.read_events(args.events))
    except OSError as exc:
        print(f"tmtguard report: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2) if args.format == "json" else report.render_text(summary))
    return 0


def _learn(args) -> int:
    from . import learn

    try:
        proposal = learn.propose(learn.read_events(args.events))
    except OSError as exc:
        print(f"tmtguard learn: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    text = learn.render(proposal, sources=args.events)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    print(learn.summary(proposal, args.output), file=sys.stderr)
    return 3 if args.fail_on_findings and proposal.findings else 0


def _pin(args) -> int:
    from . import pin

    return pin.main(args.model, args.revision, args.cache_dir, args.output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tmtguard", description="Runtime defence against transitive model threats.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate allowlist files and print the effective merged policy")
    p.add_argument("files", nargs="+", help="allowlist YAML files")
    p.add_argument("--no-builtins", action="store_true", help="do not layer the built-in allowlists underneath")
    p.add_argument("--format", choices=("yaml", "json"), default="yaml")
    p.set_defaults(func=_check)

    p = sub.add_parser("demo", help="build a benign and a transitive malicious checkpoint and load both under the guard")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="run a program under the guard, with no code change (tmtguard run -- python app.py)",
                       description="Run CMD with the guard active in it and in every Python process it starts.")
    p.add_argument("--mode", choices=("enforce", "audit", "off"), help="TMTGUARD_MODE for the program (default: "
                   "the inherited TMTGUARD_MODE, else enforce)")
    p.add_argument("--allowlist", action="append", default=[], metavar="FILE",
                   help="an allowlist file (repeatable); replaces an inherited TMTGUARD_ALLOWLIST")
    p.add_argument("--events", metavar="FILE", help="append one JSON line per decision to FILE (TMTGUARD_EVENTS)")
    p.add_argument("--otel-exporter", choices=("global", "console", "otlp", "none"),
                   help="where spans and metrics go (TMTGUARD_OTEL_EXPORTER)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=_run)

    p = sub.add_parser("report", help="summarize an events file by outermost artifact and nested chain")
    p.add_argument("events", nargs="+", metavar="EVENTS.jsonl")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_report)

    p = sub.add_parser("learn", help="propose the smallest allowlist that permits what an audit run recorded")
    p.add_argument("events", nargs="+", metavar="EVENTS.jsonl")
    p.add_argument("-o", "--output", metavar="FILE", help="write the allowlist here (default: standard output)")
    p.add_argument("--fail-on-findings", action="store_true",
                   help="exit with status 3 when some recorded action cannot safely be allowed")
    p.set_defaults(func=_learn)

    p = sub.add_parser("pin", help="print the remote_code allowlist entries a model needs (repos, commits, file digests)",
                       description="Resolve MODEL from the local Hugging Face cache or a folder, follow its auto_map "
                       "to every repo it pulls code from, and print remote_code.allow entries for review.")
    p.add_argument("model", metavar="MODEL", help="org/name in the local hub cache, or a model folder")
    p.add_argument("--revision", help="branch, tag or commit of MODEL (default: main)")
    p.add_argument("--cache-dir", help="the hub cache (default: HF_HUB_CACHE, else HF_HOME/hub)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the allowlist here (default: standard output)")
    p.set_defaults(func=_pin)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
