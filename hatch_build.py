"""Wheel build hook: compile tmtguard's optional C audit hook (``tmtguard/_auditfast.c``).

Where a C compiler and the Python headers are present (the project's machines have both), the wheel
carries ``tmtguard/_auditfast*.so`` and is tagged for this interpreter and platform. Where they are
not, the build says so and produces a pure-Python wheel: tmtguard then uses its Python audit hook,
which makes the same decisions more slowly (see the README's Benchmarks section).
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = os.path.join("tmtguard", "_auditfast.c")


def compile_extension(root: str, out_dir: str) -> str | None:
    """Build the extension into out_dir (the object file into a temporary folder); its path, or None
    (with the reason on stderr)."""
    cc = sysconfig.get_config_var("CC")
    ldshared = sysconfig.get_config_var("LDSHARED")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths().get("include")
    if not (cc and ldshared and suffix and include) or sys.platform == "win32":
        print("tmtguard: no C toolchain configured for this Python; building without the C audit hook",
              file=sys.stderr)
        return None
    if not shutil.which(shlex.split(cc)[0]) or not os.path.exists(os.path.join(include, "Python.h")):
        print(f"tmtguard: {shlex.split(cc)[0]} or Python.h not found; building without the C audit hook",
              file=sys.stderr)
        return None
    source = os.path.join(root, SOURCE)
    obj_dir = tempfile.mkdtemp(prefix="tmtguard-obj-")
    obj = os.path.join(obj_dir, "_auditfast.o")
    target = os.path.join(out_dir, "_auditfast" + suffix)
    ccshared = sysconfig.get_config_var("CCSHARED") or "-fPIC"
    steps = (
        shlex.split(cc) + shlex.split(ccshared) + ["-O2", "-I", include, "-c", source, "-o", obj],
        shlex.split(ldshared) + [obj, "-o", target],
    )
    try:
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"tmtguard: building the C audit hook failed ({' '.join(cmd)}):\n{proc.stderr}"
                      "building without it", file=sys.stderr)
                return None
    finally:
        shutil.rmtree(obj_dir, ignore_errors=True)
    return target


class CustomBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version, build_data):
        if self.target_name != "wheel":
            return
        if version == "editable":
            # the editable install imports tmtguard from the source tree: build the module next to it
            built = compile_extension(self.root, os.path.join(self.root, "tmtguard"))
            if built:
                build_data["pure_python"] = False
                build_data["infer_tag"] = True
            return
        self._tmp = tempfile.mkdtemp(prefix="tmtguard-build-")
        built = compile_extension(self.root, self._tmp)
        if built:
            build_data["force_include"][built] = "tmtguard/" + os.path.basename(built)
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def finalize(self, version, build_data, artifact_path):
        tmp = getattr(self, "_tmp", None)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
