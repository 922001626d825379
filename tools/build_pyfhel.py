"""Install Pyfhel 3.5.0 (Microsoft SEAL) from its PyPI sdist, reproducibly and offline-safe.

PyPI has no cp311 wheel of Pyfhel, and its sdist's build fails without internet: SEAL's CMake
fetches Microsoft GSL, zlib and Zstandard with git (../shared/research/he.md §6). This script
downloads the sdist (sha256-checked), switches those three optional SEAL features off in its
pyproject.toml (the only change), builds a wheel once (about 4–5 minutes on 2 cores) and keeps it in
``$FEDTUNE_WHEEL_CACHE`` (default ``~/.cache/fedtune/wheels``), then installs it. Later installs reuse
the cached wheel. Run by ``make install``; ``--pip PATH`` names the environment's pip.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

VERSION = "3.5.0"
SDIST_SHA256 = "0375b83b5a83026924f59db25c4efa9f27e1e8a66d004658f4d24195986a04b6"
SWITCHES = {"SEAL_USE_MSGSL": "OFF", "SEAL_USE_ZLIB": "OFF", "SEAL_USE_ZSTD": "OFF"}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FEDTUNE_WHEEL_CACHE", pathlib.Path.home() / ".cache" / "fedtune" / "wheels"))


def patch(pyproject: pathlib.Path) -> None:
    """Turn SEAL's network-fetched optional dependencies off; fail loudly if the file changed shape."""
    lines = pyproject.read_text().splitlines()
    changed = 0
    for i, line in enumerate(lines):
        name = line.split("=")[0].strip()
        if name in SWITCHES and "'ON'" in line:
            lines[i] = line.replace("'ON'", f"'{SWITCHES[name]}'")
            changed += 1
    if changed != len(SWITCHES):
        raise SystemExit(f"error: expected to switch {len(SWITCHES)} SEAL options in {pyproject}, found {changed}")
    pyproject.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pip", default=f"{sys.executable} -m pip", help="pip of the target environment")
    args = parser.parse_args()
    pip = args.pip.split()
    python = str(pathlib.Path(pip[0]).with_name("python")) if pip[0].endswith("pip") else sys.executable
    probe = subprocess.run([python, "-c", f"import Pyfhel, importlib.metadata as m; assert m.version('Pyfhel') == '{VERSION}'"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        print(f"Pyfhel {VERSION} already installed")
        return 0
    cache = cache_dir()
    wheels = sorted(cache.glob(f"[Pp]yfhel-{VERSION}-cp{sys.version_info.major}{sys.version_info.minor}-*.whl"))
    if not wheels:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            work = pathlib.Path(tmp)
            subprocess.run([*pip, "download", "--quiet", "--no-deps", "--no-binary", "pyfhel", "-d", str(work),
                            f"pyfhel=={VERSION}"], check=True)
            (sdist,) = work.glob("*.tar.gz")
            digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
            if digest != SDIST_SHA256:
                raise SystemExit(f"error: {sdist.name} has sha256 {digest}, expected {SDIST_SHA256}")
            with tarfile.open(sdist) as archive:
                archive.extractall(work, filter="data")
            source = work / f"pyfhel-{VERSION}"
            patch(source / "pyproject.toml")
            print(f"building Pyfhel {VERSION} (Microsoft SEAL) from source: about 4-5 minutes", flush=True)
            subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(cache), str(source)], check=True)
        wheels = sorted(cache.glob(f"[Pp]yfhel-{VERSION}-*.whl"))
    subprocess.run([*pip, "install", "--quiet", "--no-deps", str(wheels[-1])], check=True)
    print(f"installed {wheels[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
