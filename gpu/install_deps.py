#!/usr/bin/env python3
"""Installs the project's own Python dependencies on the GPU machine, from .gpu-deps/python.tar.xz.

Standard library only: it runs before anything is installed. The bundle holds one folder per
wheel of gpu/requirements.txt (gpu/prepare.sh). A package is copied into --target when this
interpreter lacks it or has another version (the project's pins win: --target goes first on
PYTHONPATH); an identical one is left alone. Requirements marked `# image` are not carried:
they must already be here, and their versions are reported.

    python3 gpu/install_deps.py --bundle .gpu-deps/python.tar.xz --target /tmp/chat-site [--all]

Exit status: 0 ready; 2 a carried wheel is missing from the bundle or an `# image` package
from the machine.
"""

import argparse
import importlib.metadata as metadata
import json
import re
import shutil
import sys
import tarfile
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(carried, from the image): canonical name -> pinned version."""
    carried: dict[str, str] = {}
    image: dict[str, str] = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if not requirement:
            continue
        name, _, version = requirement.partition("==")
        (image if "# image" in line else carried)[canonical(name)] = version
    return carried, image


def unpacked_wheels(bundle: Path, into: Path) -> dict[str, tuple[str, Path]]:
    """Unpacks the bundle; canonical name -> (version, folder) read from each wheel's METADATA."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(into, filter="data")
    wheels = {}
    for folder in sorted(p for p in into.iterdir() if p.is_dir()):
        for info in folder.glob("*.dist-info/METADATA"):
            fields = dict(
                line.split(": ", 1)
                for line in info.read_text().splitlines()
                if ": " in line and line[0] != " "
            )
            wheels[canonical(fields["Name"])] = (fields["Version"], folder)
    return wheels


def installed_versions(exclude: Path) -> dict[str, str]:
    """What this interpreter already finds (PYTHONPATH included), outside the target folder."""
    paths = [p for p in sys.path if p and not Path(p).resolve().is_relative_to(exclude.resolve())]
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=paths):
        found.setdefault(canonical(dist.metadata["Name"]), dist.version)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path(".gpu-deps/python.tar.xz"))
    parser.add_argument("--requirements", type=Path, default=Path("gpu/requirements.txt"))
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--all", action="store_true", help="install every carried wheel (dry run)")
    parser.add_argument("--report", type=Path, help="write what was done here (JSON)")
    args = parser.parse_args()
    carried, image = read_requirements(args.requirements)
    wheels = unpacked_wheels(args.bundle, args.target.with_name(args.target.name + "-wheels"))
    have = installed_versions(args.target)
    args.target.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, str]] = {}
    problems = []
    for name, pinned in sorted(carried.items()):
        if wheels.get(name, ("", Path()))[0] != pinned:
            problems.append(f"{name}=={pinned} is not in {args.bundle}: run gpu/prepare.sh")
            continue
        version, folder = wheels[name]
        if args.all or have.get(name) != version:
            shutil.copytree(folder, args.target, dirs_exist_ok=True)
            report[name] = {"found": have.get(name, "none"), "action": f"installed {version}"}
        else:
            report[name] = {"found": version, "action": "kept"}
    for name, pinned in sorted(image.items()):
        if name not in have:
            problems.append(
                f"{name} is not on this machine: carry it (drop `# image` in {args.requirements})"
            )
            continue
        note = "" if have[name] == pinned else f" (project pins {pinned})"
        report[name] = {"found": have[name], "action": "from the image" + note}
    for name, row in report.items():
        print(f"[deps] {name:28} {row['found']:>12}  {row['action']}")
    for problem in problems:
        print(f"[deps] FAIL {problem}")
    if args.report:
        args.report.write_text(json.dumps({"packages": report, "problems": problems}, indent=2) + "\n")
    print(f"[deps] {'READY' if not problems else 'FAILED'}: {args.target} ({len(problems)} problem(s))")
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
