"""Allowlist files: validation with file, line and key; merging; scoping; the built-ins; `tmtguard check`."""
from __future__ import annotations

import subprocess
import sys

import pytest

import tmtguard
from tmtguard.policy import AllowlistError, Policy, builtin_allowlist_files, can_run_code, parse, parse_net_rule


def err(text: str) -> str:
    with pytest.raises(AllowlistError) as info:
        parse(text, "/etc/x.yaml")
    return str(info.value)


def test_full_example_from_the_format_parses():
    af = parse("""version: 1
pickle:
  allow:
    - collections:OrderedDict
    - myapp.models:Net
imports:
  allow: [tokenizers, "mylib.*"]
network:
  allow: ["127.0.0.1:8080", "*.internal.example:443", "10.0.0.0/8:*"]
remote_code:
  allow:
    - repo: org/name
      revision: 0123456789abcdef0123456789abcdef01234567
      files:
        modeling_x.py: sha256:""" + "ab" * 32 + "\n", "f.yaml")
    assert ("myapp.models", "Net") in af.base.pickle
    assert af.base.pickle[("myapp.models", "Net")].line == 5
    assert set(af.base.imports) == {"tokenizers", "mylib.*"}
    assert af.remote_code[0].files == (("modeling_x.py", "ab" * 32),)


@pytest.mark.parametrize("text,expect", [
    ("version: 1\npickles:\n  allow: []\n", ":2: unknown key 'pickles'"),
    ("version: 1\npickle:\n  allow: collections:OrderedDict\n", ":3: 'pickle.allow' must be a list"),
    ("version: 1\npickle:\n  allow:\n    - collections.OrderedDict\n", ":4: 'collections.OrderedDict' in pickle.allow is not module:qualname"),
    ("version: 1\npickle:\n  allow:\n    - 'os:system; rm'\n", ":4:"),
    ("version: 1\npickle:\n  allow: [a:b]\npickle:\n  allow: [c:d]\n", ":4: duplicate key 'pickle'"),
    ("version: 2\n", ":1: 'version' must be 1"),
    ("pickle:\n  allow: []\n", "missing 'version: 1'"),
    ("version: 1\npickle: [a:b]\n", ":2: 'pickle' must be a mapping"),
    ("version: 1\npickle:\n  allow:\n    - 3\n", ":4: every entry of 'pickle.allow' must be a non-empty string"),
    ("version: 1\nnetwork:\n  allow: ['example.com']\n", ":3: 'example.com' in network.allow"),
    ("version: 1\nnetwork:\n  allow: ['example.com:99999']\n", "port '99999'"),
    ("version: 1\nnetwork:\n  process_wide: maybe\n", "must be true or false"),
    ("version: 1\nremote_code:\n  allow:\n    - repo: a/b\n      revision: main\n", ":5: remote_code.allow[0].revision must be a 40-hex commit"),
    ("version: 1\nartifacts:\n  - pickle:\n      allow: [a:b]\n", "artifacts[0] needs 'match:'"),
    ("version: 1\nartifacts:\n  - match: {sha256: nothex}\n", "artifacts[0].match.sha256 must be 64 hex"),
    ("version: 1\npickle:\n  allow: [a:b\n", "not valid YAML"),
    ("version: 1\npickle: !!python/object:os.system {}\n", ":2: YAML tag 'tag:yaml.org,2002:python/object:os.system' is not allowed"),
    ("", "empty allowlist"),
])
def test_malformed_allowlists_name_file_line_and_key(text, expect):
    message = err(text)
    assert message.startswith("/etc/x.yaml"), message
    assert expect in message, message


def test_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(AllowlistError, match="cannot read allowlist"):
        Policy.from_files([tmp_path / "missing.yaml"])
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(AllowlistError, match="not UTF-8"):
        Policy.from_files([bad])


def test_bad_allowlist_leaves_the_active_guard_untouched(guard, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("version: 1\npickle:\n  allow: [builtins:len]\n")
    guard(allowlists=[good])
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npickle:\n  allow: [nope]\n")
    with pytest.raises(AllowlistError, match="bad.yaml:3"):
        tmtguard.activate(mode="enforce", allowlists=[bad])
    assert str(good) in tmtguard.status()["allowlists"], "the working policy is kept, nothing lost"
    import pickle

    import artifacts as A

    assert pickle.loads(A.dumps(A.call(A.glob("builtins", "len"), "ab"))) == 2


def test_layers_only_widen_and_keep_sources(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("version: 1\npickle:\n  allow: [x.y:Z]\n")
    b = tmp_path / "b.yaml"
    b.write_text("version: 1\npickle:\n  allow:\n    - q:R\n")
    policy = Policy.from_files([a, b])
    assert policy.pickle_allowed("x.y", "Z", ()).file == str(a)
    assert policy.pickle_allowed("q", "R", ()).line == 4
    assert policy.pickle_allowed("collections", "OrderedDict", ()) is not None  # built-in still there
    assert Policy.from_files([a], builtins=False).pickle_allowed("collections", "OrderedDict", ()) is None


def test_net_rules():
    assert parse_net_rule("127.0.0.1:8080").matches("127.0.0.1", 8080)
    assert not parse_net_rule("127.0.0.1:8080").matches("127.0.0.1", 8081)
    assert parse_net_rule("10.0.0.0/8:*").matches("10.2.3.4", 1)
    assert parse_net_rule("*.internal.example:443").matches("api.internal.example", 443)
    assert not parse_net_rule("*.internal.example:443").matches("internal.example.evil.com", 443)
    assert parse_net_rule("[::1]:80").matches("::1", 80)
    assert parse_net_rule("unix:/run/x.sock").matches("/run/x.sock", None)


# --- the built-in allowlists -----------------------------------------------------------------------


def test_builtins_contain_nothing_that_runs_code():
    policy = Policy.from_files([], builtins=True)
    never = [("numpy.testing._private.utils", "runstring"), ("torch.jit.unsupported_tensor_ops", "execWrapper"),
             ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
             ("posix", "system"), ("os", "system"), ("subprocess", "Popen"), ("torch", "load"),
             ("torch.serialization", "load"), ("pickle", "loads"), ("numpy", "load"), ("joblib", "load"),
             ("importlib", "import_module"), ("operator", "attrgetter"), ("functools", "partial")]
    for module, name in never:
        assert policy.pickle_allowed(module, name, ()) is None, f"{module}:{name} must never be built in"
    assert not any("*" in m or "*" in q for m, q in policy.base.pickle), "no namespace wildcards"
    assert not policy.base.network and not policy.base.process


def test_every_builtin_entry_says_why_it_is_safe():
    import re

    for path in builtin_allowlist_files():
        for n, line in enumerate(open(path), 1):
            if re.match(r"\s+- [\w.]+:[\w.]+", line):
                assert "#" in line, f"{path}:{n} has no comment saying why it is safe"


def test_can_run_code_flags_the_usual_suspects():
    assert can_run_code("posix", "system") and can_run_code("builtins", "eval")
    assert can_run_code("numpy.testing._private.utils", "runstring")
    assert not can_run_code("collections", "OrderedDict") and not can_run_code("builtins", "set")


# --- tmtguard check -------------------------------------------------------------------------------


def test_check_prints_the_effective_policy(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("version: 1\npickle:\n  allow: [myapp.models:Net]\nartifacts:\n  - match: {repo: org/m}\n    imports:\n      allow: [tokenizers]\n")
    out = subprocess.run([sys.executable, "-m", "tmtguard", "check", str(a)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "myapp.models:Net" in out.stdout and "collections:OrderedDict" in out.stdout
    assert "repo: org/m" in out.stdout and "tokenizers" in out.stdout
    import yaml

    assert yaml.safe_load(out.stdout)["version"] == 1


def test_check_reports_errors_with_a_nonzero_exit(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("version: 1\npickle:\n  allow: [ok:Fine]\n  allow: [x:y]\n")
    out = subprocess.run([sys.executable, "-m", "tmtguard", "check", str(a)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert f"{a}:4: duplicate key 'allow'" in out.stderr
