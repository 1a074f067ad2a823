"""Make ready what a lent GPU machine needs for ``benchmarks/device_run.sh``.

The workplace's ``device`` tool runs one command on a machine with an NVIDIA H200 over a
copy of the working tree: no internet there, its own Python (3.12, with PyTorch, numpy,
scipy, scikit-image, tifffile, pandas, safetensors), at most 64 MiB travelling, a few
minutes of device time per task. This script puts under ``.device/`` (ignored by git, so
nothing here is ever committed) what that machine lacks:

- ``data/bbbc010``: the BBBC010 training half's bright-field (w2) images, per-worm masks
  and README (the Sytox w1 images stay behind: training reads w2 only), about 37 MB;
- ``wheels``: the packages the machine lacks (``WHEELS``), at the versions installed
  here, for its Python and platform, about 10 MB.

It then checks that the whole working tree that travels (tracked and untracked files git
does not ignore, plus ``.device``) stays under the tool's 64 MiB, and prints the call::

    python benchmarks/device_bundle.py --data ../shared/data/bbbc010
    # then, with the device tool: run(command="bash benchmarks/device_run.sh",
    #                                  carry=[".device"], timeout_s=600)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: what the device machine's image lacks of the package's needs for training, prediction
#: and tests/test_cuda.py (its package list: /work/.library/device/KINDS.md)
WHEELS = ("tomli-w", "pycocotools", "zarr", "numcodecs", "donfig", "google-crc32c")

#: the device tool's limit on what travels
LIMIT_BYTES = 64 * 2**20

#: pip's platform tags for the device machine (x86-64 Linux, glibc >= 2.28)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def copy_data(source: Path, dest: Path) -> int:
    """Copy a BBBC010 folder's w2 images, masks and README; return the bytes copied.

    Parameters
    ----------
    source : Path
        The BBBC010 folder (``images/``, ``masks/``).
    dest : Path
        Where the copy goes (replaced when it exists).

    Returns
    -------
    int
        Bytes copied.
    """
    images = sorted((source / "images").glob("*_w2_*.tif"))
    masks = sorted((source / "masks").glob("*.png"))
    if not images or not masks:
        raise FileNotFoundError(
            f"{source} has no BBBC010 bright-field images (images/*_w2_*.tif) or masks "
            "(masks/*.png)"
        )
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    files = [(p, dest / "images" / p.name) for p in images]
    files += [(p, dest / "masks" / p.name) for p in masks]
    if (source / "README.md").is_file():
        files.append((source / "README.md", dest / "README.md"))
    for src, dst in files:
        shutil.copyfile(src, dst)
    return sum(dst.stat().st_size for _, dst in files)


def download_wheels(dest: Path, python_version: str, names: tuple[str, ...] = WHEELS) -> int:
    """Download binary wheels of ``names`` at the versions installed here; return bytes.

    Parameters
    ----------
    dest : Path
        Folder for the wheels (emptied first).
    python_version : str
        The device's Python, e.g. ``"3.12"``.
    names : tuple of str
        Distributions to fetch (without their dependencies: list every one needed).

    Returns
    -------
    int
        Bytes downloaded.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    pins = [f"{name}=={metadata.version(name)}" for name in names]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    command += ["--only-binary=:all:", "--python-version", python_version]
    command += ["--implementation", "cp", "-d", str(dest)]
    for tag in PLATFORMS:
        command += ["--platform", tag]
    subprocess.run(command + pins, check=True)
    return sum(p.stat().st_size for p in dest.glob("*.whl"))


def travelling_bytes(repo: Path, carried: list[Path]) -> int:
    """Bytes of what the device tool sends: files git tracks or does not ignore, and carried.

    Parameters
    ----------
    repo : Path
        The repository root.
    carried : list of Path
        Ignored folders named in ``carry``.

    Returns
    -------
    int
        Their total size.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = repo / name.decode()
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    for folder in carried:
        total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total


def is_ignored(repo: Path, path: Path) -> bool:
    """Whether git ignores ``path`` (so that what is put there is never committed)."""
    done = subprocess.run(
        ["git", "check-ignore", "-q", str(path.relative_to(repo))], cwd=repo, check=False
    )
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/bbbc010"))
    parser.add_argument("--dest", default=str(REPO / ".device"), help="inside the repository")
    parser.add_argument("--python-version", default="3.12", help="the device machine's Python")
    parser.add_argument("--skip-wheels", action="store_true", help="copy the data only")
    args = parser.parse_args(argv)
    dest = Path(args.dest).resolve()
    try:
        dest.relative_to(REPO)
    except ValueError:
        parser.error(f"--dest {dest} must lie inside the repository {REPO} (it travels)")
    dest.mkdir(parents=True, exist_ok=True)  # (git tells a folder's ignore rule once it exists)
    if not is_ignored(REPO, dest):
        parser.error(f"{dest} is not ignored by git; the data must never be committed")
    data = copy_data(Path(args.data), dest / "data" / "bbbc010")
    print(f"data: {data / 2**20:.1f} MiB in {dest / 'data' / 'bbbc010'}")
    if not args.skip_wheels:
        wheels = download_wheels(dest / "wheels", args.python_version)
        print(f"wheels: {wheels / 2**20:.1f} MiB in {dest / 'wheels'}")
    total = travelling_bytes(REPO, [dest])
    print(f"travels: {total / 2**20:.1f} MiB of the device tool's {LIMIT_BYTES / 2**20:.0f}")
    if total > LIMIT_BYTES:
        print("too much to travel: leave out untracked files or carry less", file=sys.stderr)
        return 1
    rel = dest.relative_to(REPO)
    print(f'device: run(command="bash benchmarks/device_run.sh", carry=["{rel}"], timeout_s=600)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
