"""Download the wheels `benchmarks/gpu_check.py` installs on a CUDA machine that has PyTorch and nothing else of
ours, and no network: run it here (with network) in the project's venv, then carry the folder to that machine.

    .venv/bin/python tools/fetch_wheels.py                       # -> build/wheels/ (ignored by git)
    .venv/bin/python tools/fetch_wheels.py --python-version 3.11 # the GPU machine's Python, when not 3.12

What goes in: setup.py's install_requires without torch, plus pytest (the `test` extra), at the versions pinned
in requirements-ci.txt (the ones CI tests), and every package they need (Requires-Dist, markers evaluated for
Linux x86-64 and the target Python), at the versions installed in this venv — minus what a PyTorch install
already brings (torch's own requirements: sympy, networkx, jinja2, fsspec, setuptools, ...; filelock and
typing-extensions are still shipped, our pins being newer than many torch installs), minus OMIT (``--omit``:
hf-xet, huggingface_hub's download accelerator, imported only to fetch from the Hub; matplotlib with the
packages only it needs — 17.7 MB, used by `unidad-dist report`'s figure alone, which the check does not draw;
typer and click with rich & co., the command lines of transformers and huggingface_hub, which the library
code we run does not import).
Not in: the optional extras (ray, submitit, wandb), torch itself. Binary wheels are fetched for the target
Python (``--python-version``, default 3.12: the lent H200 machine's) and manylinux x86-64; deepspeed, published
as a source distribution only, is built here into a pure-Python wheel with DS_BUILD_OPS=0 (no compiled ops:
DeepSpeed JIT-builds an op only if a recipe asks for one, and ours use torch's Adam). The folder ends with
``manifest.json`` (each wheel, the target Python) and is checked against ``--max-mib`` (default 60 MiB, in
the unit of the device tool's limit: it carries at most 64 MiB, the repository's files and the carried folder
together); the total with the repository's files is printed too. With the defaults: 46 wheels, 60.9 MB
(58.0 MiB) for CPython 3.12 — numpy (16.7 MB), transformers (13.3), pillow (7.1) and diffusers (6.4) are most
of it.
"""
from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# Packages not shipped although a dependency names them: hf-xet is huggingface_hub's download accelerator
# (imported only when a file is fetched from the Hub; the GPU check runs offline); matplotlib draws
# `unidad-dist report`'s figure (imported there alone), which the check does not run; typer and click are the
# command lines of transformers and huggingface_hub (a training run imports neither).
OMIT = ("hf-xet", "matplotlib", "typer", "click")
CARRY_LIMIT_MIB = 64  # the device tool: the repository's files and the carried folders together
MIB = 2 ** 20
# torch's requirements that are still shipped: tiny, and our pins ask for newer versions than torch does
KEEP_FROM_TORCH = ("filelock", "typing-extensions")
SDIST_ONLY = ("deepspeed",)  # built here with `pip wheel` (DS_BUILD_OPS=0)
PLATFORMS = ("manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64",
             "manylinux1_x86_64", "manylinux2010_x86_64", "linux_x86_64")


def fail(msg: str) -> None:
    print(f"fetch_wheels: {msg}", file=sys.stderr)
    raise SystemExit(2)


def setup_requirements(setup_py: Path) -> tuple[list[str], list[str]]:
    """(install_requires, extras_require['test']) as written in setup.py (read, not executed)."""
    tree = ast.parse(setup_py.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: k.value for k in node.keywords}
            install = ast.literal_eval(kw["install_requires"])
            extras = ast.literal_eval(kw["extras_require"]) if "extras_require" in kw else {}
            return list(install), list(extras.get("test", []))
    fail(f"no setup(...) call with install_requires in {setup_py}")


def pins(requirements: Path) -> dict[str, str]:
    """name -> version of every `name==version` line (extras in brackets dropped)."""
    out = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            req = Requirement(line)
            out[canonicalize_name(req.name)] = str(req.specifier).lstrip("=")
    return out


def marker_env(python_version: str) -> dict:
    return {"python_version": python_version, "python_full_version": python_version + ".0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "platform_python_implementation": "CPython", "implementation_name": "cpython",
            "implementation_version": python_version + ".0", "platform_release": "", "platform_version": "",
            "extra": ""}


def requires(name: str, env: dict) -> list[Requirement]:
    """The installed distribution's unconditional requirements (no extras) that apply on the target."""
    out = []
    for text in md.distribution(name).requires or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        out.append(req)
    return out


def installed(name: str):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def closure(roots: list[Requirement], env: dict, exclude: set) -> dict[str, str]:
    """name -> 'name==version' (installed here) or the requirement (not installed here) for every package the
    roots need, walking Requires-Dist; ``exclude`` (canonical names) are neither shipped nor walked."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in exclude or name in found:
            continue
        version = installed(req.name)
        if version is None:
            found[name] = str(Requirement(f"{req.name}{req.specifier}"))  # pip picks one for the target
            continue
        found[name] = f"{name}=={version}"
        todo.extend(requires(req.name, env))
    return found


def torch_provides(env: dict) -> set:
    """What a PyTorch install brings with it: torch and the closure of its requirements."""
    if installed("torch") is None:
        fail("torch is not installed in this Python; run this tool with the project's venv (.venv/bin/python)")
    seen = {"torch"}
    todo = requires("torch", env)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        if installed(req.name) is not None:
            todo.extend(requires(req.name, env))
    return seen


def wanted(python_version: str, omit: tuple) -> dict[str, str]:
    install, test = setup_requirements(ROOT / "setup.py")
    pinned = pins(ROOT / "requirements-ci.txt")
    env = marker_env(python_version)
    roots = []
    for text in install + test:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        version = pinned.get(name)
        have = installed(req.name)
        if version is not None and have != version:
            fail(f"{req.name} {have or 'is not installed'} here but requirements-ci.txt pins {version}: run "
                 "`make install` first (this tool reads the pinned packages' requirements from the venv)")
        roots.append(Requirement(f"{req.name}=={version or have}") if (version or have) else req)
    exclude = (torch_provides(env) - {canonicalize_name(n) for n in KEEP_FROM_TORCH}) | {
        canonicalize_name(n) for n in omit}
    return closure(roots, env, exclude)


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        fail(f"`{' '.join(cmd[:6])} ...` failed (exit {r.returncode}):\n{tail}")


def repository_bytes():
    """Bytes of the files a device call sends: tracked and untracked-not-ignored (None outside a git checkout)."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True)
    if r.returncode != 0:
        return None
    files = {ROOT / f for f in r.stdout.decode().split("\0") if f}
    return sum(f.stat().st_size for f in files if f.is_file())


def wheel_name(path: Path) -> str:
    return canonicalize_name(path.name.split("-")[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "build" / "wheels"), help="folder for the wheels (emptied of "
                    "wheels that are no longer wanted)")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's Python, major.minor (`python3 -V` "
                    "there; the lent H200 machine has 3.12)")
    ap.add_argument("--omit", default=",".join(OMIT), help="comma-separated packages not to ship")
    ap.add_argument("--max-mib", type=float, default=60.0, help="fail when the wheels take more (MiB)")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python_version):
        fail(f"--python-version {args.python_version!r}: give major.minor, e.g. 3.12")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    omit = tuple(n for n in args.omit.split(",") if n)
    want = wanted(args.python_version, omit)
    binary = [spec for name, spec in sorted(want.items()) if name not in SDIST_ONLY]
    sdist = [spec for name, spec in sorted(want.items()) if name in SDIST_ONLY]
    tag = args.python_version.replace(".", "")
    print(f"fetching {len(want)} packages for CPython {args.python_version} on manylinux x86-64 into {out}")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", args.python_version,
        "--implementation", "cp", "--abi", f"cp{tag}", "--abi", "abi3", "--abi", "none", *platforms,
        "-d", str(out), *binary)
    for spec in sdist:
        pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), spec,
            env={**os.environ, "DS_BUILD_OPS": "0"})
    names = set(want)
    kept = []
    for f in sorted(out.glob("*.whl")):
        if wheel_name(f) in names:
            kept.append(f)
        else:
            f.unlink()  # left from an earlier fetch: another version set or another Python
    missing = names - {wheel_name(f) for f in kept}
    if missing:
        fail(f"no wheel came for {', '.join(sorted(missing))}")
    dup = sorted(n for n in names if sum(wheel_name(f) == n for f in kept) > 1)
    if dup:
        fail(f"two wheels of {', '.join(dup)} in {out} (pip would refuse to install both): empty the folder and "
             "fetch again")
    total = sum(f.stat().st_size for f in kept)
    for f in sorted(kept, key=lambda f: -f.stat().st_size):
        print(f"  {f.stat().st_size / 1e6:7.2f} MB  {f.name}")
    repo = repository_bytes()
    print(f"total {total / 1e6:.1f} MB = {total / MIB:.1f} MiB in {len(kept)} wheels (limit {args.max_mib:g} MiB); "
          f"not shipped: torch and what it brings, {', '.join(omit) or 'nothing else'}")
    if repo is not None:
        print(f"with the repository's files ({repo / MIB:.1f} MiB) a device call carries {(repo + total) / MIB:.1f} "
              f"MiB of its {CARRY_LIMIT_MIB} MiB")
    (out / "manifest.json").write_text(json.dumps(
        {"python_version": args.python_version, "platform": "manylinux x86_64", "omitted": list(omit),
         "total_bytes": total, "wheels": [f.name for f in kept]}, indent=2) + "\n")
    if total > args.max_mib * MIB:
        fail(f"the wheels take {total / MIB:.1f} MiB, over --max-mib {args.max_mib:g}: --omit what the GPU check "
             "does not need")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
