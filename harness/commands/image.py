"""`powercut image build`: build (or find in the cache) the guest image.

    powercut image build            # progress, then where the image is
    powercut image build --json     # kernel, initramfs, root disk, key, manifest paths
    powercut image build --package sqlite3 --package postgresql   # more Debian packages
    powercut image build --kernel arch/x86/boot/bzImage --modules /tmp/m/lib/modules/6.9.0

The image is keyed by the hash of images/, the kernel, and the version of
every Debian package in its root; a second build of the same inputs is a
cache hit. An unknown package, or a kernel without what the guest needs, is
an error before anything is built.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from harness.vm.build import build
from harness.vm.kernel import FEATURES
from harness.vm.recipe import recipe_dir

NAME = "image"
HELP = "build the guest image (kernel + initramfs) from Debian packages, cached by recipe hash"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help=HELP, description=HELP)
    b.add_argument("--json", action="store_true", help="print the image's paths as JSON")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    add_image_arguments(b)
    b.add_argument(
        "--recipe",
        type=Path,
        default=recipe_dir(),
        metavar="DIR",
        help="the recipe directory (default: the repository's images/)",
    )
    b.add_argument(
        "--cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache directory (default $POWERCUT_CACHE or ~/.cache/powercut)",
    )


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """--package, --kernel, --modules, --needs: shared with `powercut vm`."""
    parser.add_argument(
        "--package",
        dest="packages",
        action="append",
        default=[],
        metavar="NAME",
        help="a Debian package (with its dependencies) to add to the guest root; repeatable",
    )
    parser.add_argument(
        "--kernel",
        type=Path,
        default=None,
        metavar="PATH",
        help="boot this kernel (bzImage or vmlinux) instead of Debian's",
    )
    parser.add_argument(
        "--modules",
        type=Path,
        default=None,
        metavar="PATH",
        help="the kernel's lib/modules/RELEASE tree (when features are modules)",
    )
    parser.add_argument(
        "--needs",
        action="append",
        default=[],
        choices=sorted(FEATURES),
        metavar="FEATURE",
        help="a kernel feature to check before boot (e.g. xfs); repeatable",
    )


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    with err.status("building the guest image") as status:
        result = build(
            args.recipe,
            args.cache,
            packages=args.packages,
            kernel=args.kernel,
            modules=args.modules,
            needs=args.needs,
            force=args.force,
            progress=lambda msg: status.update(f"guest image: {msg}"),
        )
    image = result.image
    if args.json:
        data = {
            **image.to_json(),
            "cache_hit": result.cache_hit,
            "seconds": round(result.seconds, 2),
        }
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return 0
    state = "cached" if result.cache_hit else f"built in {result.seconds:.1f}s"
    out = Console(soft_wrap=True)
    out.print(f"guest image {image.recipe_hash} ({state}): {image.directory}")
    out.print(f"  kernel     {image.kernel}")
    out.print(f"  initramfs  {image.initramfs}")
    out.print(f"  root disk  {image.root_disk}")
    if image.packages:
        out.print(f"  packages   {' '.join(image.packages)}")
    out.print(f"  ssh key    {image.ssh_key}")
    out.print(f"  manifest   {image.manifest}")
    out.print(f"  append     {image.cmdline}")
    return 0
