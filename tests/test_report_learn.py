"""``tmtguard report`` and ``tmtguard learn``: from an audit run's events to a reviewed allowlist.

The unit tests feed hand-written events in the documented schema; the round trip runs a real
application under ``tmtguard run`` in audit mode, learns from what it recorded and enforces the result."""
from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import textwrap

import pytest

import artifacts as A
from tmtguard import cli, learn, report
from tmtguard.policy import Policy, parse
from tmtguard.provenance import LoadFrame

REV = "0123456789abcdef0123456789abcdef01234567"
SHA_OUTER, SHA_INNER, SHA_CODE = "a" * 64, "b" * 64, "c" * 64
OUTER = {"loader": "torch.load", "artifact": "/models/model.pt", "sha256": SHA_OUTER}
INNER = {"loader": "torch.load", "artifact": "<bytes:1705>", "sha256": SHA_INNER}
CODE = {"loader": "remote_code", "artifact": f"org/code@{REV}/modeling_x.py", "sha256": SHA_CODE,
        "repo": "org/code", "revision": REV}
HUGE = {"loader": "torch.load", "artifact": "/models/huge.pt", "sha256": None}
TORCH_ORIGIN = {"module": "torch.serialization", "file": "/site/torch/serialization.py", "line": 2221,
                "function": "_load", "distribution": {"name": "torch", "version": "2.13.0"}}


def ev(action, target, chain=(), *, decision="audited", t=1_700_000_000.0, pid=100, detail=None, origin=None):
    rec = {"time": t, "pid": pid, "mode": "audit" if decision == "audited" else "enforce", "decision": decision,
           "action": action, "target": target, "rule": "in no allowlist", "chain": list(chain), "origin": origin}
    if detail:
        rec["detail"] = detail
    return rec


def write_events(path, records, junk=()):
    with open(path, "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        for line in junk:
            fh.write(line + "\n")
    return path


def frame(sha256, **kw):
    return LoadFrame("torch.load", "/somewhere.pt", sha256=sha256, **kw)


# --- report -------------------------------------------------------------------------------------------


def test_report_groups_by_outermost_artifact_then_chain(tmp_path, capsys):
    t0 = 1_700_000_000.0
    events = write_events(tmp_path / "events.jsonl", [
        ev("pickle.global", "myapp.config:TrainConfig", [OUTER], t=t0 + 0, origin=TORCH_ORIGIN),
        ev("pickle.global", "myapp.config:TrainConfig", [OUTER], t=t0 + 10, pid=101, origin=TORCH_ORIGIN),
        ev("pickle.global", "myapp.config:TrainConfig", [OUTER], t=t0 + 5, origin=TORCH_ORIGIN),
        ev("pickle.global", "posix:system", [OUTER, INNER], t=t0 + 7, decision="blocked", origin=TORCH_ORIGIN),
        ev("network.connect", "10.0.0.1:9000", [], t=t0 - 50),
    ], junk=["{truncated", "", '"a string"'])
    assert cli.main(["report", str(events), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["events"] == 5 and summary["skipped_lines"] == 2 and summary["processes"] == 2
    assert summary["decisions"] == {"audited": 4, "blocked": 1}
    model, app = summary["artifacts"]  # the artifact with a blocked action comes first
    assert (model["artifact"], model["sha256"], model["count"]) == ("/models/model.pt", SHA_OUTER, 4)
    assert (model["first"], model["last"]) == (t0, t0 + 10)
    own, nested = model["chains"]
    assert [f["artifact"] for f in own["chain"]] == ["/models/model.pt"]
    [cfg] = own["attempts"]
    assert (cfg["action"], cfg["target"], cfg["count"], cfg["first"], cfg["last"]) == \
        ("pickle.global", "myapp.config:TrainConfig", 3, t0, t0 + 10)
    assert cfg["decisions"] == {"audited": 3}
    assert cfg["origins"] == [{"origin": "torch 2.13.0: torch.serialization (/site/torch/serialization.py:2221)", "count": 3}]
    assert [f["artifact"] for f in nested["chain"]] == ["/models/model.pt", "<bytes:1705>"]
    assert [(a["target"], a["decisions"]) for a in nested["attempts"]] == [("posix:system", {"blocked": 1})]
    assert app["artifact"] is None and app["chains"][0]["attempts"][0]["target"] == "10.0.0.1:9000"

    assert cli.main(["report", str(events)]) == 0
    text = capsys.readouterr().out
    assert "5 events (4 audited, 1 blocked) from 2 process(es)" in text
    assert "chain: torch.load(/models/model.pt sha256=aaaaaaaaaaaa…) -> torch.load(<bytes:1705> sha256=bbbbbbbbbbbb…)" in text
    assert "posix:system" in text and "blocked x1" in text and "audited x3" in text
    assert report.NO_LOAD in text and "(2 line(s) skipped" in text


def test_report_of_a_missing_file_says_so(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


# --- learn ----------------------------------------------------------------------------------------------


def test_learn_proposes_the_smallest_scoped_allowlist_and_never_what_cannot_be_safe(tmp_path, capsys):
    records = [
        ev("pickle.global", "myapp.config:TrainConfig", [OUTER]),
        ev("pickle.global", "myapp.config:TrainConfig", [OUTER]),
        ev("pickle.global", "collections:Counter", [OUTER]),
        ev("pickle.global", "collections:Counter", [{"loader": "pickle.loads", "artifact": "<unknown>", "sha256": None}]),
        ev("pickle.global", "myapp.big:Layer", [HUGE]),
        ev("pickle.global", "posix:system", [OUTER, INNER]),
        ev("pickle.global", "builtins:exec", [OUTER]),
        ev("process.spawn", "curl", [OUTER, INNER], detail={"executable": "/usr/bin/curl"}),
        ev("process.spawn", "/usr/bin/git", [CODE]),
        ev("process.spawn", "/bin/sh", [CODE], detail={"command": "git rev-parse HEAD | tee x"}),
        ev("network.connect", "api.example.com:443", [CODE]),
        ev("network.resolve", "api.example.com", [CODE], detail={"host": "api.example.com", "port": 443}),
        ev("network.resolve", "metrics.internal", [CODE], detail={"host": "metrics.internal", "port": None}),
        ev("network.connect", "evil.example:80", [OUTER, INNER]),
        ev("file.open", "/data/vocab.txt", [CODE]),
        ev("file.open", "/home/u/.aws/credentials", [CODE], detail={"secret": "cloud credentials"}),
        ev("code.exec", "torch.fx", [CODE]),
        ev("code.exec", "pickle", [OUTER]),
        ev("import", "tokenizers", [CODE]),
        ev("guard.tamper", "TMTGUARD_MODE", [CODE]),
        ev("remote_code.load", f"org/code@{REV}/modeling_x.py", [CODE],
           detail={"repo": "org/code", "revision": REV, "file": "modeling_x.py", "sha256": SHA_CODE}),
        ev("remote_code.load", "org/other@main/x.py", [], detail={"repo": "org/other", "revision": None}),
        ev("gpu.mine", "everything", [CODE]),
    ]
    events = write_events(tmp_path / "events.jsonl", records)
    out = tmp_path / "learned.yaml"
    assert cli.main(["learn", str(events), "-o", str(out)]) == 0
    text = out.read_text()
    parse(text, str(out))  # valid version 1, by tmtguard's own parser
    policy = Policy.from_files([out], builtins=False)
    outer, code, other, huge = frame(SHA_OUTER), frame(SHA_CODE, repo="org/code"), frame("d" * 64), \
        LoadFrame("torch.load", "/models/huge.pt", path="/models/huge.pt", sha256="e" * 64)

    # What the audited run needed: permitted, for the artifact that needed it and no other.
    assert policy.pickle_allowed("myapp.config", "TrainConfig", (outer,))
    assert not policy.pickle_allowed("myapp.config", "TrainConfig", (other,))
    assert policy.pickle_allowed("myapp.big", "Layer", (huge,))  # no digest recorded: scoped by path
    assert not policy.pickle_allowed("myapp.big", "Layer", (other,))
    assert policy.pickle_allowed("collections", "Counter", (other,))  # needed outside any artifact: global
    assert policy.process_allowed("/usr/bin/git", (code,)) and not policy.process_allowed("/usr/bin/git", (other,))
    assert policy.network_allowed("api.example.com", 443, (code,))
    assert not policy.network_allowed("api.example.com", 80, (code,))
    assert policy.network_allowed("metrics.internal", 8125, (code,))
    assert policy.file_allowed("/data/vocab.txt", (code,))
    assert policy.code_allowed("torch.fx", (code,)) and policy.import_allowed("tokenizers", (code,))
    [rc] = policy.remote_code
    assert (rc.repo, rc.revision, rc.files) == ("org/code", REV, (("modeling_x.py", SHA_CODE),))
    assert text.count("collections:Counter") == 1  # the global entry covers the scoped one: smallest
    assert text.count("api.example.com:443") == 1

    # What no allowlist can make safe: never proposed, listed as findings.
    for module, name in (("posix", "system"), ("builtins", "exec")):
        assert not policy.pickle_allowed(module, name, (frame(SHA_INNER),))
    assert not policy.process_allowed("/bin/sh", (code,)) and not policy.process_allowed("/usr/bin/curl", (outer,))
    assert not policy.network_allowed("evil.example", 80, (frame(SHA_INNER),))
    assert not policy.file_allowed("/home/u/.aws/credentials", (code,))
    assert not policy.code_allowed("pickle", (outer,))
    found = {(f.action, f.target) for f in learn.propose(report.read_events([events])).findings.values()}
    assert found == {("pickle.global", "posix:system"), ("pickle.global", "builtins:exec"),
                     ("process.spawn", "curl"), ("process.spawn", "/bin/sh"), ("network.connect", "evil.example:80"),
                     ("file.open", "/home/u/.aws/credentials"), ("code.exec", "pickle"), ("guard.tamper", "TMTGUARD_MODE"),
                     ("remote_code.load", "org/other@main/x.py"), ("gpu.mine", "everything")}
    err = capsys.readouterr().err
    assert "10 finding(s) NOT allowed" in err and "posix:system" in err

    # Every entry says which chain needed it.
    lines = text.splitlines()
    i = lines.index("        - myapp.config:TrainConfig")
    assert lines[i - 1] == "        # needed by: torch.load(/models/model.pt sha256=aaaaaaaaaaaa…)  (x2)"
    assert lines[i - 2] == ("        # WARNING: torch.load(/models/model.pt sha256=aaaaaaaaaaaa…) also attempted what is "
                            "listed under Findings below")
    assert "# note: a lookup names no port" in text
    assert "#   - pickle.global posix:system (audited x1)" in text  # findings, as comments at the end
    assert cli.main(["learn", str(events), "--fail-on-findings", "-o", str(out)]) == 3


def test_learn_from_real_audit_events_of_a_malicious_pickle(guard, tmp_path, marker):
    """In-process audit of a real payload: the guard records, the payload runs, learn refuses to bless it."""
    events = guard(mode="audit")
    pickle.loads(A.marker_pickle(str(marker)))
    assert marker.exists()  # audit does not block
    path = write_events(tmp_path / "events.jsonl", [json.loads(json.dumps(e, default=str)) for e in events])
    proposal = learn.propose(report.read_events([path]))
    assert ("pickle.global", "posix:system") in {(f.action, f.target) for f in proposal.findings.values()}
    assert not any(e.value in ("posix:system", "/bin/sh", "echo") for e in proposal.entries.values())
    parse(learn.render(proposal, sources=[path]), "learned")


# --- the round trip: audit in staging, learn, enforce in production ---------------------------------------


APP = """
import os, sys, torch
for path in sys.argv[1:]:
    try:
        ckpt = torch.load(path, weights_only=False)
        print("loaded", os.path.basename(path), type(ckpt["config"]).__name__, ckpt["config"].lr)
    except Exception as exc:
        print("refused", os.path.basename(path), type(exc).__name__)
"""


@pytest.fixture
def application(tmp_path, monkeypatch):
    """A benign application whose checkpoint holds its own config class, and a malicious checkpoint."""
    torch = pytest.importorskip("torch")
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "config.py").write_text(textwrap.dedent("""
        class TrainConfig:
            def __init__(self, lr):
                self.lr = lr
    """))
    (tmp_path / "app.py").write_text(APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        from myapp.config import TrainConfig

        torch.save({"w": torch.ones(3), "config": TrainConfig(0.25)}, tmp_path / "good.pt")
    finally:
        for name in [n for n in sys.modules if n == "myapp" or n.startswith("myapp.")]:
            del sys.modules[name]
    inner = A.torch_bytes({"w": torch.ones(2), "cfg": A.system_payload(str(tmp_path / "PWNED"))})
    torch.save({"w": torch.zeros(2), "config": None, "nested": A.nested_from_bytes(inner)}, tmp_path / "evil.pt")
    return tmp_path


def run_cli(*args, cwd):
    from conftest import subprocess_env

    return subprocess.run([sys.executable, "-m", "tmtguard", *map(str, args)], cwd=cwd, env=subprocess_env(),
                          capture_output=True, text=True, timeout=180)


def test_audit_learn_enforce_round_trip(application, capsys):
    d = application
    staging = d / "staging-events.jsonl"
    # 1. staging: audit mode, the benign application as it really runs.
    out = run_cli("run", "--mode", "audit", "--events", staging, "--", sys.executable, "app.py", "good.pt", cwd=d)
    assert out.returncode == 0 and out.stdout == "loaded good.pt TrainConfig 0.25\n", out.stderr[-2000:]
    recorded = report.read_events([staging]).records
    assert ("pickle.global", "myapp.config:TrainConfig") in {(e["action"], e["target"]) for e in recorded}
    # 2. the report names what the artifact needed.
    assert cli.main(["report", str(staging), "--format", "json"]) == 0
    [art] = json.loads(capsys.readouterr().out)["artifacts"]
    assert art["artifact"] == str(d / "good.pt")
    # 3. learn: scoped to good.pt's digest.
    learned = d / "allowlist.yaml"
    assert cli.main(["learn", str(staging), "-o", str(learned)]) == 0
    text = learned.read_text()
    digest = hashlib.sha256((d / "good.pt").read_bytes()).hexdigest()
    assert f"match: {{sha256: {digest}}}" in text and "- myapp.config:TrainConfig" in text
    assert "Findings" not in text
    # 4. production: enforce with the learned file. The benign load passes; the malicious one is still refused.
    production = d / "production-events.jsonl"
    out = run_cli("run", "--allowlist", learned, "--events", production, "--", sys.executable, "app.py",
                   "good.pt", "evil.pt", cwd=d)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["loaded good.pt TrainConfig 0.25", "refused evil.pt PickleViolation"]
    assert not (d / "PWNED").exists()
    blocked = report.read_events([production]).records
    assert blocked and all(e["chain"][0]["artifact"] == str(d / "evil.pt") for e in blocked)
    assert ("pickle.global", "posix:system") in {(e["action"], e["target"]) for e in blocked}
