"""Peer tools the guard is compared against. Imported only inside child processes of peer configs.

Each helper raises ``PeerRejected`` when the tool refuses the (benign) fixture, so that a peer
that cannot load realistic data shows up as an error in the table instead of a fast fake number.

What the installed versions expose (checked against fickling 0.1.12, picklescan 1.0.5,
modelscan 0.8.8):

* fickling: ``fickling.activate_safe_ml_environment(also_allow=None)`` monkey-patches
  ``pickle.load``/``pickle.loads``/``pickle.Unpickler`` (and the ``_pickle`` ones) with
  ``FicklingMLUnpickler``, a ``pickle.Unpickler`` subclass whose ``find_class`` checks an ML
  allow-list. torch.load(weights_only=False) picks it up because torch subclasses
  ``pickle_module.Unpickler`` at call time. ``datetime`` is not on the allow-list, so the
  pickle.loads workload passes ``also_allow`` for the globals its records use.
* picklescan: ``picklescan.scanner.scan_file_path(path)`` / ``scan_pickle_bytes(io, file_id)``
  return a ``ScanResult`` (``issues_count``, ``infected_files``, ``scan_err``, ``globals``).
  It only scans; loading is a separate step, so the peer is timed as scan + load.
* modelscan: ``modelscan.modelscan.ModelScan().scan(path)`` returns a dict whose
  ``summary.total_issues`` counts findings (and ``errors`` lists scanner failures). A fresh
  ModelScan per scan, as its CLI does (an instance accumulates issues across scans).
"""

from __future__ import annotations

import io


class PeerRejected(RuntimeError):
    pass


# --------------------------------------------------------------------------- fickling


def fickling_activate(also_allow: list[str] | None = None) -> None:
    import fickling

    fn = getattr(fickling, "activate_safe_ml_environment", None)
    if fn is None:  # older/newer layouts
        from fickling.hook import activate_safe_ml_environment as fn  # type: ignore[no-redef]
    fn(also_allow=also_allow)


# --------------------------------------------------------------------------- picklescan


def _picklescan_verdict(result, what: str) -> None:
    if getattr(result, "scan_err", False):
        raise PeerRejected(f"picklescan could not scan {what}")
    if getattr(result, "issues_count", 0) or getattr(result, "infected_files", 0):
        raise PeerRejected(f"picklescan flagged {what}: {getattr(result, 'globals', '?')}")


def picklescan_check_file(path: str) -> None:
    from picklescan.scanner import scan_file_path

    _picklescan_verdict(scan_file_path(path), path)


def picklescan_check_bytes(data: bytes, file_id: str = "record") -> None:
    from picklescan.scanner import scan_pickle_bytes

    _picklescan_verdict(scan_pickle_bytes(io.BytesIO(data), file_id), file_id)


# --------------------------------------------------------------------------- modelscan


def modelscan_check_file(path: str) -> None:
    from modelscan.modelscan import ModelScan

    report = ModelScan().scan(path)
    summary = report.get("summary", {})
    if summary.get("total_issues"):
        raise PeerRejected(f"modelscan flagged {path}: {report.get('issues')}")
    if report.get("errors"):
        raise PeerRejected(f"modelscan errors on {path}: {report.get('errors')}")
    if not summary.get("scanned", {}).get("total_scanned"):
        raise PeerRejected(f"modelscan scanned nothing in {path}")
