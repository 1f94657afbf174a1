"""Build hook: compile the eBPF object (``make -C bpf``) as part of building the package.

The agent never compiles anything at run time; the object ships in the wheel
as ``agent/_bpf/flowship.bpf.o``. Set FLOWSHIP_SKIP_BPF=1 to build a package
without it (for the exporter alone, on machines without clang).
"""

import os
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithBpf(build_py):
    def run(self) -> None:
        if os.environ.get("FLOWSHIP_SKIP_BPF") != "1":
            subprocess.run(["make", "-s", "-C", "bpf"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
