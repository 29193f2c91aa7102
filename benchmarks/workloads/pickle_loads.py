"""20,000 pickle.loads of small, realistic records.

Each record is a dict with a datetime, an OrderedDict, a tuple, a list of floats and some strings,
so every loads resolves at least two globals (datetime.datetime, collections.OrderedDict) through
find_class. The per-call fixed cost of a guard (creating an unpickler, checking a policy) is what
this measures; its budget is looser (1.30) because the calls are tiny.
"""

from __future__ import annotations

from pathlib import Path

NAME = "pickle_loads"
N_RECORDS = 20_000
TITLE = f"pickle.loads x {N_RECORDS:,} small records (datetime, OrderedDict)"
BUDGET = 1.30
PEERS = ("fickling",)
# Scanning each in-memory record with picklescan costs ~20x the loads themselves (seconds per
# repetition): only with --all-peers.
EXTRA_PEERS = ("picklescan",)
REPS = 15
QUICK_REPS = 5
KIND = "inprocess"

# fickling's ML allow-list has collections.OrderedDict but not datetime: allow exactly what the
# records use, as a user of fickling would have to.
FICKLING_ALSO_ALLOW = ["datetime.datetime", "datetime.timezone", "datetime.timedelta"]


def prepare(cache_dir: Path) -> dict:
    return {"n": N_RECORDS}


def make_records(n: int) -> list[bytes]:
    import collections
    import datetime
    import pickle

    base = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
    out = []
    for i in range(n):
        rec = {
            "id": i,
            "user": f"user-{i % 977}",
            "ts": base + datetime.timedelta(seconds=37 * i),
            "features": collections.OrderedDict(
                (("clicks", i % 13), ("dwell", (i % 101) / 7.0), ("lang", "en"))
            ),
            "scores": [((i * k) % 997) / 997.0 for k in range(1, 6)],
            "shape": (i % 7, 3),
            "label": None if i % 5 else "positive",
        }
        out.append(pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL))
    return out


def setup(params: dict, config: str):
    import pickle  # looked up as pickle.loads at call time, so monkey-patching peers apply

    records = make_records(params["n"])
    n = len(records)

    if config == "picklescan":
        from benchmarks.peers import picklescan_check_bytes

        def run():
            loads = pickle.loads
            out = None
            for i, data in enumerate(records):
                picklescan_check_bytes(data, f"record{i}")
                out = loads(data)
            assert out["id"] == n - 1

        return run

    if config == "fickling":
        from benchmarks.peers import fickling_activate

        fickling_activate(also_allow=FICKLING_ALSO_ALLOW)

    def run():
        out = None
        for data in records:
            out = pickle.loads(data)
        assert out["id"] == n - 1

    return run
