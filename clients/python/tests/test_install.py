"""`pip install ./clients/python` works offline, into a fresh venv: the
in-tree build backend needs nothing from a package index (pip runs with
--no-index, so any attempt to fetch a build dependency fails the test)."""

import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Install(unittest.TestCase):
    def test_pip_install_offline_in_fresh_venv(self):
        probe = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True)
        self.assertEqual(probe.returncode, 0, "pip is missing: install python3-pip and python3-venv (scripts/setup)")
        with tempfile.TemporaryDirectory(prefix="smolvm-py-venv-") as d:
            venv = os.path.join(d, "venv")
            # a venv without its own pip (fast); this interpreter's pip
            # installs into it (pip >= 22.3: --python)
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
            py = os.path.join(venv, "bin", "python")
            e = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
            e.pop("PYTHONPATH", None)
            p = subprocess.run(
                [sys.executable, "-m", "pip", "--python", py, "install", "--no-index", "--no-cache-dir", ROOT],
                capture_output=True, env=e, cwd=d,
            )
            self.assertEqual(p.returncode, 0, p.stdout.decode() + p.stderr.decode())
            got = subprocess.run(
                [py, "-c", "import smolvm; print(smolvm.__file__); print(smolvm.SmolVM.from_snapshot.__name__)"],
                capture_output=True, env=e, cwd=d, check=True,
            ).stdout.decode().splitlines()
            self.assertTrue(got[0].startswith(os.path.join(venv, "lib")), got)


if __name__ == "__main__":
    unittest.main()
