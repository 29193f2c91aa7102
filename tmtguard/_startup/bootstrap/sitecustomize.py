"""tmtguard's ``sitecustomize``, for programs started with ``tmtguard run`` (which puts this folder
first on PYTHONPATH, as ``opentelemetry-instrument`` and ``ddtrace-run`` do).

Two jobs, in this order: activate the guard before any application code runs, then hand over to the
application's own ``sitecustomize`` (the next one on ``sys.path``), which this module shadows.

Activation is idempotent with the installed ``tmtguard-startup.pth``: when that hook already ran,
``import tmtguard`` here is a dictionary lookup. This module must not import tmtguard when
``TMTGUARD_MODE`` is unset or ``off`` (the hook's contract: unset costs nothing), so the chaining
lives here rather than in the package.
"""
import os
import sys


def _activate():
    mode = (os.environ.get("TMTGUARD_MODE") or "off").strip().lower()
    if mode == "off":
        return
    try:
        import tmtguard  # noqa: F401  (the import activates the guard; a bad setting exits in enforce)
    except Exception as exc:  # tmtguard (or a dependency) cannot be imported by this interpreter
        sys.stderr.write(f"tmtguard: cannot start the guard in {sys.executable}: {type(exc).__name__}: {exc}\n")
        if mode == "audit":
            sys.stderr.write("tmtguard: audit mode: going on unguarded\n")
            return
        sys.stderr.write("tmtguard: refusing to start unguarded (mode %s); install tmtguard for this "
                         "interpreter or set TMTGUARD_MODE=off\n" % mode)
        sys.stderr.flush()
        os._exit(78)  # EX_CONFIG, as tmtguard._startup does for an unusable setting


def _chain():
    """Run the ``sitecustomize`` this one shadows, as the application's own would have run."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    ours = sys.modules.get(__name__)
    module = importlib.util.module_from_spec(spec)
    # The import system keeps whatever sits in sys.modules when this module finishes, so a later
    # ``import sitecustomize`` gets the application's module, as it would without tmtguard.
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules[__name__] = ours  # site reports the error ("Error in sitecustomize") as usual
        raise


if __name__ == "sitecustomize":
    _activate()
    _chain()
