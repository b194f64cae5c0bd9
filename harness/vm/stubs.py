"""Stand-ins for the shared libraries a guest program links but never uses.

fio links the rbd, gluster, nbd, rdma and pmem engines, and loading their
~100 libraries (ceph, ICU, boost, krb5) costs ~0.7 s per fio start under
TCG. The recipe's `[stubs]` names the program and the libraries (globs); each
is replaced, for that program only, by a library of the same soname that
exports the symbols the program imports, with the same symbol versions:
functions trap if ever called, data objects are zero-filled.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import ImageBuildError
from harness.vm.recipe import Recipe
from harness.vm.tools import run

STUB_DIR = "usr/lib/powercut/stubs"


def needed(path: str) -> list[str]:
    """The sonames an ELF file links (its NEEDED entries)."""
    out = run(["readelf", "-d", "-W", path], f"reading the dynamic section of {path}")
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@dataclass(frozen=True)
class Stub:
    """A library replaced by a stub that exports the symbols its importers use."""

    soname: str
    real: str  # the host library it stands in for
    importers: tuple[str, ...]  # host paths of the ELF files that link it


def stub_library(stub: Stub, work: Path) -> bytes:
    """Compile a stand-in for `stub.real`: same soname, the imported symbols and versions.

    Functions trap if ever called (say, fio's rbd engine), and data objects
    are zero-filled, so what the guest never uses costs nothing at boot.
    """
    kinds: dict[str, tuple[str, int]] = {}
    out = run(["nm", "-DS", "--defined-only", stub.real], f"reading the symbols of {stub.real}")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        size = int(parts[1], 16) if len(parts) == 4 else 0
        kind, name = parts[-2], parts[-1].split("@", 1)[0]
        kinds[name] = (kind, size)
    versions: dict[str, set[str]] = {}
    wanted: set[str] = set()
    for importer in stub.importers:
        und = run(["nm", "-D", "--undefined-only", importer], f"reading {importer}")
        for line in und.splitlines():
            ref = line.split()[-1]
            name, _, version = ref.partition("@")
            if name in kinds:
                wanted.add(name)
                versions.setdefault(version.lstrip("@"), set()).add(name)
    lines = [f"/* powercut stub for {stub.soname} (from {stub.real}) */"]
    for name in sorted(wanted):
        kind, size = kinds[name]
        if kind.upper() in ("T", "W", "I", "i"):
            lines.append(
                f'__attribute__((visibility("default"))) void {name}(void) {{ __builtin_trap(); }}'
            )
        else:
            lines.append(f'__attribute__((visibility("default"))) char {name}[{max(size, 1)}];')
    src = work / f"{stub.soname}.c"
    src.write_text("\n".join(lines) + "\n")
    argv = [
        "gcc",
        "-shared",
        "-fPIC",
        "-nostdlib",
        "-w",
        "-O1",
        f"-Wl,-soname,{stub.soname}",
        "-o",
        str(work / stub.soname),
        str(src),
    ]
    named = sorted(v for v in versions if v)
    if named:
        unversioned = versions.get("", set())
        nodes = []
        for i, v in enumerate(named):
            syms = sorted(versions[v] | (unversioned if i == 0 else set()))
            nodes.append(f"{v} {{ global: {' '.join(s + ';' for s in syms)} }};")
        script = work / f"{stub.soname}.map"
        script.write_text("\n".join(nodes) + "\n")
        argv.insert(-3, f"-Wl,--version-script={script}")
    run(argv, f"compiling the stub of {stub.soname} (needs gcc)")
    return (work / stub.soname).read_bytes()


def stub_program(recipe: Recipe, root: Path, work: Path) -> dict[str, str]:
    """Run `[stubs].program` with stand-ins for the libraries it never uses.

    The stubs go into their own directory and a wrapper of the same name in
    /usr/local/bin (first on PATH) points only that program at them, so the
    root's real libraries stay intact for any package that uses them.
    Returns soname → the real library's path in the root, for the manifest.
    """
    conf = recipe.data.get("stubs", {})
    program, patterns = conf.get("program"), list(conf.get("libraries", []))
    if not program or not patterns:
        return {}
    prog = root / program
    libdir = root / "usr" / "lib" / "x86_64-linux-gnu"
    stub_dir = root / STUB_DIR
    stub_dir.mkdir(parents=True, exist_ok=True)
    stubbed: dict[str, str] = {}
    for soname in needed(str(prog)):
        if not any(fnmatch.fnmatchcase(soname, pat) for pat in patterns):
            continue
        real = libdir / soname
        if real.is_symlink() and not os.readlink(real).startswith("/"):
            real = libdir / os.readlink(real)
        if not real.is_file():
            raise ImageBuildError(f"{program} needs {soname}, which the root does not have")
        (stub_dir / soname).write_bytes(stub_library(Stub(soname, str(real), (str(prog),)), work))
        stubbed[soname] = str(real.relative_to(root))
    wrapper = root / "usr" / "local" / "bin" / prog.name
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(
        "#!/bin/sh\n# powercut: stand-ins for libraries this program never uses (recipe [stubs])\n"
        f"LD_LIBRARY_PATH=/{STUB_DIR}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}} "
        f'exec /{program} "$@"\n'
    )
    wrapper.chmod(0o755)
    return stubbed
