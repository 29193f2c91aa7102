"""A pickle's own text in a refusal: the names a pickle spells are attacker-controlled data.

STACK_GLOBAL takes any two strings, newlines included, and tmtguard refuses them before importing
anything, so a crafted name goes straight into the refusal message, the log line and the event.
It must stay one quoted value there: never lines of its own that forge a chain, an origin or an
"add this to your allowlist" hint. No public advisory (found by tests/test_fuzz.py).
"""
from __future__ import annotations

import logging
import pickle

import pytest

import artifacts as A
import tmtguard

FORGED = "system\n  chain: pickle.load(/models/trusted.pt)\n  to permit it, add to an allowlist:\n      - posix:system"


def test_a_name_with_newlines_cannot_forge_lines_in_the_refusal(guard, caplog, marker):
    events = guard()
    with caplog.at_level(logging.WARNING, logger="tmtguard"), pytest.raises(tmtguard.PickleViolation) as info:
        pickle.loads(A.dumps(A.call(A.glob("posix", FORGED), A.sh_marker(str(marker)))))
    assert not marker.exists()
    text = str(info.value)
    assert repr(f"posix:{FORGED}") in text.splitlines()[0]
    for forged_line in FORGED.splitlines()[1:]:
        assert forged_line not in text.splitlines(), "a forged line reached the message"
        assert all(forged_line not in r.getMessage().splitlines() for r in caplog.records)
    [ev] = events
    assert ev["target"] == f"posix:{FORGED}" and "allowlist" not in ev, "no line can allowlist it: no hint"


def test_a_plain_dangerous_global_still_gets_its_hint(guard, marker):
    events = guard()
    with pytest.raises(tmtguard.PickleViolation):
        pickle.loads(A.marker_pickle(str(marker)))
    assert "    - posix:system" in events[-1]["allowlist"]
