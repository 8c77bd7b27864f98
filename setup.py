"""Build hook: the wheel carries templates/, cluster/ and jobs/ as package data in hpcai/_share/.

They stay top-level in the repository (its layout and their source of truth), outside the package, which
setup.cfg's package_data cannot reach; hpcai.resources finds the copies in an installed wheel. Editable
installs copy nothing: there hpcai.resources uses the checkout's directories. Everything else is in setup.cfg.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHARED = ("templates", "cluster", "jobs")  # hpcai.resources.KINDS


class BuildPyWithShared(build_py):
    """build_py, then copy the shared directories into build_lib/hpcai/_share (a wheel without them fails)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in SHARED:
            src = ROOT / name
            # Dot files are editor and interrupted-write leftovers, not shipped files.
            files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not files:
                raise SystemExit(f"setup.py: {src}: missing or empty; the wheel would ship no {name}/")
            for f in files:
                dst = Path(self.build_lib, "hpcai", "_share", name, f.relative_to(src))
                self.mkpath(str(dst.parent))
                self.copy_file(str(f), str(dst), preserve_mode=False)


setup(cmdclass={"build_py": BuildPyWithShared})
