"""Do requirements.txt's pins resolve on a CUDA Linux machine?

    python .ci/check_pins.py [--requirements requirements.txt]

The project machines install torch's CPU wheel, which requires no triton; the Linux wheel on PyPI
(the CUDA build) pins its own triton. A triton pin that disagrees makes `pip install -r
requirements.txt` fail to resolve on every GPU machine, and nothing on a CPU machine would show it.
This reads the real requirements of the pinned torch's manylinux wheel from the package index
without installing it (pip's dry-run report, no local wheels, no pip configuration) and fails when
any pin of ours falls outside what that wheel requires. .ci/run runs it; it needs the index.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement

PLATFORM = "manylinux_2_28_x86_64"  # the CUDA build's wheel


def pins(text):
    """{name: version} of the `name==version` lines of a requirements file."""
    out = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                out[req.name.lower()] = exact[0]
    return out


def conflicts(ours, requires_dist, python_version):
    """Lines naming each pin of ours that a Linux wheel with these requirements does not accept."""
    env = dict(platform_system="Linux", sys_platform="linux", os_name="posix", platform_machine="x86_64",
               python_version=python_version, python_full_version=python_version + ".0", extra="")
    bad = []
    for line in requires_dist:
        req = Requirement(line)
        if req.name.lower() in ours and (req.marker is None or req.marker.evaluate(env)):
            if not req.specifier.contains(ours[req.name.lower()], prereleases=True):
                bad.append(f"{req.name}=={ours[req.name.lower()]}: the Linux wheel requires {req.name}{req.specifier}")
    return bad


def linux_requires(name, version, python_version):
    """requires_dist of name==version's manylinux wheel, from the index (pip's --dry-run --report)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}  # no local wheels, no config
        env["PIP_CONFIG_FILE"] = os.devnull
        cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed", "--no-deps",
               "--only-binary=:all:", "--platform", PLATFORM, "--python-version", python_version, "--target",
               os.path.join(tmp, "target"), "--quiet", "--report", report, f"{name}=={version}"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"error: could not read {name}=={version}'s {PLATFORM} wheel from the index: "
                     f"{(r.stderr.strip().splitlines() or ['pip failed'])[-1]}")
        with open(report) as f:
            return json.load(f)["install"][0]["metadata"].get("requires_dist", [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requirements", default=os.path.join(os.path.dirname(__file__), "..", "requirements.txt"))
    args = p.parse_args()
    with open(args.requirements) as f:
        ours = pins(f.read())
    if "torch" not in ours:
        sys.exit(f"error: {args.requirements} pins no torch version (torch==X.Y.Z)")
    python_version = ".".join(platform.python_version_tuple()[:2])
    requires = linux_requires("torch", ours["torch"], python_version)
    bad = conflicts(ours, requires, python_version)
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if bad:
        sys.exit("pip install -r requirements.txt would not resolve on CUDA Linux: change the pins above")
    checked = sorted(n for n in ours if any(Requirement(r).name.lower() == n for r in requires))
    print(f"pins ok: torch=={ours['torch']}'s {PLATFORM} wheel (Python {python_version}) accepts "
          + ", ".join(f"{n}=={ours[n]}" for n in checked))


if __name__ == "__main__":
    main()
