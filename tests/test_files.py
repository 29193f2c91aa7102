"""file.open / file.write: what guarded loads and model code may read and write."""
from __future__ import annotations

import os
import sys

import pytest

import payloads as P
import tmtguard
from conftest import write_allowlist


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fake HOME holding credentials, so the real ones are never read."""
    h = tmp_path / "home"
    (h / ".aws").mkdir(parents=True)
    (h / ".aws" / "credentials").write_text("[default]\naws_secret_access_key = FAKESECRET\n")
    (h / ".ssh").mkdir()
    (h / ".ssh" / "id_rsa").write_text("-----BEGIN FAKE KEY-----\n")
    monkeypatch.setenv("HOME", str(h))
    return h


def steal(secret: str, marker) -> str:
    """forward() code: read the secret and drop it where the attacker can pick it up (the marker)."""
    return f"data = open(os.path.expanduser({secret!r})).read()\nopen({str(marker)!r}, 'w').write(data)"


def marker_writable(tmp_path, marker, extra: str = ""):
    return write_allowlist(tmp_path / "w.yaml", f"version: 1\nfiles:\n  allow: [{str(marker)!r}]\n{extra}")


# --- secrets read by model code at inference ------------------------------------------------------------


def test_secret_theft_works_when_unguarded(unguarded, tmp_path, home, marker):
    P.infer(P.load_hub(P.hub_folder(tmp_path, steal("~/.aws/credentials", marker), net_imports="import os")))
    assert "FAKESECRET" in marker.read_text()


@pytest.mark.parametrize("secret,what", [
    ("~/.aws/credentials", "AWS credentials"),
    ("~/.ssh/id_rsa", "SSH keys"),
    ("/proc/self/environ", "the process environment"),
])
def test_secret_read_by_model_code_blocked_and_named(guard, tmp_path, home, marker, secret, what):
    folder = P.hub_folder(tmp_path, steal(secret, marker), net_imports="import os")
    events = guard(allowlists=[marker_writable(tmp_path, marker)])  # even with the drop spot writable
    model = P.load_hub(folder)
    with pytest.raises(tmtguard.FileViolation) as info:
        P.infer(model)
    assert not marker.exists()
    [ev] = P.of(events, "file.open")
    assert ev["target"] == os.path.expanduser(secret)
    assert ev["detail"]["secret"].startswith(what) and ev["detail"]["access"] == "read"
    assert ev["chain"][0]["loader"] == "torch.hub.load"
    assert (ev["origin"]["file"], ev["origin"]["line"]) == P.forward_line(folder, "data = open(")
    assert what in str(info.value)
    assert isinstance(info.value, PermissionError)


def test_secret_read_audited(guard, tmp_path, home, marker):
    folder = P.hub_folder(tmp_path, steal("~/.aws/credentials", marker), net_imports="import os")
    events = guard(mode="audit")
    P.infer(P.load_hub(folder))
    assert "FAKESECRET" in marker.read_text()
    assert {e["action"] for e in events} == {"file.open"}
    assert all(e["decision"] == "audited" for e in events)
    assert {e["detail"]["access"] for e in events} == {"read", "write"}


def test_secret_permitted_only_by_a_rule_naming_it(guard, tmp_path, home, marker):
    folder = P.hub_folder(tmp_path, steal("~/.aws/credentials", marker), net_imports="import os")
    guard(allowlists=[marker_writable(tmp_path, marker)])
    with pytest.raises(tmtguard.FileViolation):
        P.infer(P.load_hub(folder))
    rules = write_allowlist(tmp_path / "s.yaml", "version: 1\nfiles:\n  allow: ['~/.aws/credentials', "
                                                 f"{str(marker)!r}]\n")
    events = guard(allowlists=[rules])
    events.clear()
    P.infer(P.load_hub(folder))
    assert "FAKESECRET" in marker.read_text() and events == []


def test_secret_in_the_artifact_folder_is_still_a_secret(guard, tmp_path, home):
    # an artifact kept in HOME: its folder is readable, ~/.aws is not
    events = guard()
    (home / "notes.txt").write_text("fine")
    with tmtguard.guarded_load("custom.load", str(home / "model.bin")):
        assert open(home / "notes.txt").read() == "fine"
        with pytest.raises(tmtguard.FileViolation, match="AWS credentials"):
            open(home / ".aws" / "credentials").read()
    assert [e["target"] for e in events] == [str(home / ".aws" / "credentials")]


def test_symlink_to_a_secret_is_resolved(guard, tmp_path, home):
    folder = P.hub_folder(tmp_path, "pass")
    os.symlink(home / ".ssh" / "id_rsa", os.path.join(folder, "config.json"))
    events = guard()
    with tmtguard.guarded_load("custom.load", os.path.join(folder, "model.bin")):
        with pytest.raises(tmtguard.FileViolation):
            open(os.path.join(folder, "config.json")).read()
    [ev] = events
    assert ev["detail"]["real_path"] == str(home / ".ssh" / "id_rsa") and ev["detail"]["secret"] == "SSH keys"


def test_a_folder_swapped_for_a_link_to_secrets_is_noticed(guard, tmp_path, home, monkeypatch):
    # realpath(3) keeps a folder's real path while stat(2) finds the same directory there: a cache
    # folder read once, then replaced by a link to ~/.ssh, must not keep its old real path
    hf_home = tmp_path / "hf"
    (hf_home / "hub" / "cfg").mkdir(parents=True)
    (hf_home / "hub" / "cfg" / "id_rsa").write_text("not a key")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    events = guard()
    path = str(hf_home / "hub" / "cfg" / "id_rsa")
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        assert open(path).read() == "not a key"
    os.rename(hf_home / "hub" / "cfg", hf_home / "hub" / "old")  # application code, between two loads
    os.symlink(home / ".ssh", hf_home / "hub" / "cfg")
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.FileViolation, match="SSH keys"):
            open(path).read()
    [ev] = events
    assert ev["detail"]["real_path"] == str(home / ".ssh" / "id_rsa")


def test_cached_realpath_resolves_links_at_every_level(tmp_path):
    """The C realpath keeps each folder's real path (checked by lstat/stat of the folder on every use)
    and resolves a folder it does not know from its own folder, one lstat a level: it gives
    os.path.realpath's answer for links at every level, new folders under known ones, and a folder
    swapped for a link after it was resolved."""
    from tmtguard import provenance

    import importlib.util

    # the C function where the extension is built and used (the suite runs with it); os.path.realpath's
    # own walk where it is not (the guards' suites run again with the Python audit hook)
    assert (provenance._c_realpath is not None) == (importlib.util.find_spec("tmtguard._auditfast") is not None)
    base = tmp_path.resolve()
    (base / "a" / "b" / "c").mkdir(parents=True)
    (base / "x").mkdir()
    (base / "a" / "b" / "c" / "f").write_text("c")
    (base / "x" / "f").write_text("x")
    os.symlink(base / "a", base / "to_a")  # a link in the middle of the path
    os.symlink(base / "a" / "b" / "c", base / "a" / "b" / "to_c")  # a link as the folder of the file
    os.symlink(base / "x" / "f", base / "a" / "b" / "c" / "to_xf")  # the file itself a link

    def same(path):
        assert provenance.realpath(str(path)) == os.path.realpath(path), path

    for p in ("a/b/c/f", "to_a/b/c/f", "a/b/to_c/f", "to_a/b/to_c/f", "a/b/c/to_xf", "a/b/c"):
        same(base / p)
    (base / "a" / "b" / "new" / "d").mkdir(parents=True)  # folders below known ones, not resolved yet
    (base / "a" / "b" / "new" / "d" / "f").write_text("n")
    same(base / "a" / "b" / "new" / "d" / "f")
    # a folder resolved before, swapped for a link to another one (at the file's folder, and above it)
    os.rename(base / "a" / "b" / "c", base / "a" / "b" / "c_old")
    os.symlink(base / "x", base / "a" / "b" / "c")
    same(base / "a" / "b" / "c" / "f")
    os.rename(base / "a" / "b" / "new", base / "a" / "b" / "new_old")
    (base / "y" / "d").mkdir(parents=True)
    (base / "y" / "d" / "f").write_text("y")
    os.symlink(base / "y", base / "a" / "b" / "new")
    same(base / "a" / "b" / "new" / "d" / "f")
    assert provenance.realpath(str(base / "a" / "b" / "new" / "d" / "f")) == str(base / "y" / "d" / "f")


def test_home_changed_after_activation_moves_the_secrets(guard, tmp_path, monkeypatch):
    # the guard's secret patterns follow os.environ writes made after it started
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        pass  # the patterns are built for the current HOME
    h = tmp_path / "newhome"
    (h / ".aws").mkdir(parents=True)
    (h / ".aws" / "credentials").write_text("[default]\n")
    monkeypatch.setenv("HOME", str(h))
    with tmtguard.guarded_load("custom.load", str(h / "model.bin")):  # its folder is readable, ~/.aws is not
        with pytest.raises(tmtguard.FileViolation, match="AWS credentials"):
            open(h / ".aws" / "credentials").read()
    assert [e["detail"]["secret"] for e in events] == ["AWS credentials"]


# --- reads and writes around the artifact -----------------------------------------------------------------


def test_reads_the_model_needs_are_allowed(guard, tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    (hf_home / "hub").mkdir(parents=True)
    (hf_home / "hub" / "vocab.txt").write_text("a b c")
    monkeypatch.setenv("HF_HOME", str(hf_home))
    folder = P.hub_folder(tmp_path, f"""
        own = open(os.path.join(os.path.dirname(__file__), "labels.txt")).read()
        lib = open(torch.__file__).read(10)
        std = open(os.__file__ if os.__file__.endswith(".py") else json.__file__).read(10)
        cache = open({str(hf_home / "hub" / "vocab.txt")!r}).read()
        open("/dev/null").read()
    """, net_imports="import os\nimport json", files={"labels.txt": "cat dog"})
    events = guard()
    P.infer(P.load_hub(folder))
    assert events == []


def test_read_outside_blocked(guard, tmp_path):
    private = tmp_path / "app_config.yaml"
    private.write_text("db_password: hunter2")
    folder = P.hub_folder(tmp_path / "models", f"open({str(private)!r}).read()")
    events = guard()
    with pytest.raises(tmtguard.FileViolation, match="outside the artifacts' folders"):
        P.infer(P.load_hub(folder))
    [ev] = events
    assert ev["action"] == "file.open" and ev["target"] == str(private) and "secret" not in ev["detail"]
    assert f"- {str(private)!r}" in ev["allowlist"]


def test_writes_need_files_allow_even_in_the_artifact_folder(guard, tmp_path):
    folder = P.hub_folder(tmp_path, "open(os.path.join(os.path.dirname(__file__), 'cache.bin'), 'wb').write(b'x')",
                          net_imports="import os")
    events = guard()
    model = P.load_hub(folder)
    with pytest.raises(tmtguard.FileViolation):
        P.infer(model)
    assert not os.path.exists(os.path.join(folder, "cache.bin"))
    assert events[0]["detail"]["access"] == "write"
    guard(allowlists=[write_allowlist(tmp_path / "w.yaml", f"version: 1\nfiles:\n  allow: ['{folder}/*.bin']\n")])
    P.infer(model)
    assert os.path.exists(os.path.join(folder, "cache.bin"))


@pytest.mark.parametrize("how", ["os.remove", "os.rename", "os.mkdir", "os.symlink", "os.chmod", "shutil.rmtree", "os.open"])
def test_filesystem_changes_blocked(guard, tmp_path, how):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "f").write_text("x")
    calls = {
        "os.remove": lambda: os.remove(victim / "f"),
        "os.rename": lambda: os.rename(victim / "f", victim / "g"),
        "os.mkdir": lambda: os.mkdir(victim / "d"),
        "os.symlink": lambda: os.symlink("/etc/passwd", victim / "l"),
        "os.chmod": lambda: os.chmod(victim / "f", 0o777),
        "shutil.rmtree": lambda: __import__("shutil").rmtree(victim),
        "os.open": lambda: os.open(victim / "new", os.O_WRONLY | os.O_CREAT),
    }
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        with pytest.raises(tmtguard.FileViolation):
            calls[how]()
    assert sorted(p.name for p in victim.iterdir()) == ["f"] and (victim / "f").read_text() == "x"
    assert events[0]["action"] in ("file.write", "file.open") and events[0]["detail"]["access"] == "write"


def test_application_files_untouched(guard, tmp_path, home, marker):
    events = guard()
    P.load_hub(P.hub_folder(tmp_path, "pass"))
    data = open(home / ".aws" / "credentials").read()
    marker.write_text(data)
    assert "FAKESECRET" in marker.read_text() and events == []


def test_files_rule_is_not_process_wide(guard, tmp_path, home):
    events = guard(process_wide=True)
    try:
        assert "FAKESECRET" in open(home / ".aws" / "credentials").read()
    finally:
        guard()
    assert events == []


def test_pickle_reading_a_secret_at_load_time(guard, tmp_path, home):
    # even a pickle allowlist wide enough to let builtins:open through does not reach the secret
    import pickle

    import artifacts as A

    data = A.dumps(A.call(A.glob("builtins", "open"), str(home / ".aws" / "credentials")))
    events = guard(allowlists=[write_allowlist(tmp_path / "p.yaml", "version: 1\npickle:\n  allow: ['builtins:open']\n")])
    with pytest.raises(tmtguard.FileViolation, match="AWS credentials"):
        pickle.loads(data)
    [ev] = P.of(events, "file.open")
    assert ev["chain"][0]["loader"] == "pickle.loads" and ev["origin"]["file"] == __file__


# --- the C hook's read fast path (_auditfast.c read_allowed) ---------------------------------------------

native = pytest.mark.skipif(not __import__("tmtguard.guards._audit", fromlist=["native"]).native,
                            reason="the read fast path is in the C hook")


@pytest.fixture
def checks(monkeypatch):
    """The reads that reached the file guard's Python check, as (path, write) pairs."""
    from tmtguard.guards import files

    seen = []
    original = files._check

    def counting(path, write, operation):
        seen.append((os.fspath(path), write))
        return original(path, write, operation)

    monkeypatch.setattr(files, "_check", counting)
    return seen


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    h = tmp_path / "hf"
    (h / "hub").mkdir(parents=True)
    (h / "hub" / "notes.txt").write_text("fine")
    monkeypatch.setenv("HF_HOME", str(h))
    return h


@native
def test_a_cache_read_inside_a_load_is_settled_in_c(guard, tmp_path, hf_home, checks):
    events = guard()
    path = str(hf_home / "hub" / "notes.txt")
    with tmtguard.guarded_load("custom.load", str(tmp_path / "model.bin")):
        assert open(path).read() == "fine"  # the settings are computed here (a first check in Python)
        checks.clear()
        assert open(path).read() == "fine"
        import pathlib
        assert pathlib.Path(path).read_text() == "fine"  # an os.PathLike path too
        assert checks == []
        with open(path, "a") as f:  # a write is the file guard's to decide
            f.write("!")
        assert checks == [(path, True)]
    assert events == []


@native
def test_a_secret_in_a_cache_is_not_settled_in_c(guard, tmp_path, home, hf_home, checks):
    # The Hugging Face token lives in HF_HOME, a folder every chain may read: read directly, or
    # through a link elsewhere in the cache (only its real path is the secret), it is the file
    # guard's to refuse. So is a link to ~/.ssh.
    (hf_home / "token").write_text("hf_FAKE")
    os.symlink(hf_home / "token", hf_home / "hub" / "vocab.txt")
    os.symlink(home / ".ssh" / "id_rsa", hf_home / "hub" / "config.json")
    events = guard()
    with tmtguard.guarded_load("custom.load", str(tmp_path / "art" / "model.bin")):
        assert open(hf_home / "hub" / "notes.txt").read() == "fine"
        for name, what in (("token", "Hugging Face token"), ("hub/vocab.txt", "Hugging Face token"),
                           ("hub/config.json", "SSH keys")):
            with pytest.raises(tmtguard.FileViolation, match=what):
                open(hf_home / name).read()
            assert (str(hf_home / name), False) in checks  # the file guard decided it
    assert [e["detail"]["secret"] for e in events] == ["Hugging Face token", "Hugging Face token", "SSH keys"]
    assert events[1]["detail"]["real_path"] == str(hf_home / "token")


@native
def test_the_c_read_path_follows_the_settings_it_was_given(guard, tmp_path, hf_home, monkeypatch, checks):
    # Settings computed for another environment or other Hugging Face constants are not used: the
    # first read after a change goes to the file guard, which recomputes them.
    import huggingface_hub.constants as constants

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "w.txt").write_text("shared")
    events = guard()
    old = str(hf_home / "hub" / "notes.txt")
    with tmtguard.guarded_load("custom.load", str(tmp_path / "art" / "model.bin")):  # its folder: tmp_path/art
        assert open(old).read() == "fine"
        checks.clear()
        monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))  # os.environ write: HF_HOME moved
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "elsewhere"))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
        monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "elsewhere" / "assets"))
        with pytest.raises(tmtguard.FileViolation, match="outside the artifacts' folders"):
            open(old).read()  # no longer a Hugging Face cache: not readable by every chain
        assert checks[0] == (old, False)  # then what the refusal reads (where the code came from)
        monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(shared))  # a module attribute alone
        checks.clear()
        assert open(shared / "w.txt").read() == "shared"
        assert open(shared / "w.txt").read() == "shared"
        assert checks == [(str(shared / "w.txt"), False)]  # recomputed once, then settled in C
    assert [e["target"] for e in events] == [old]
