"""`python -m benchmarks [NAME...] [-- ARGS]`: run every benchmark module (or the named ones).

A benchmark is a module here with `main(argv) -> int` that records its
results under benchmarks/results/. Discovering them keeps this file out of
every change that adds one.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import benchmarks


def main(argv: list[str]) -> int:
    names, rest = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    available = sorted(
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if not info.name.startswith("_")
    )
    unknown = [n for n in names if n not in available]
    if unknown:
        print(
            f"unknown benchmark {unknown[0]!r}; available: {', '.join(available)}", file=sys.stderr
        )
        return 2
    status = 0
    for name in names or available:
        module = importlib.import_module(f"benchmarks.{name}")
        if not hasattr(module, "main"):
            continue
        print(f"== benchmark {name}", flush=True)
        status = max(status, int(module.main(rest)))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
