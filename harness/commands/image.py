"""`powercut image build`: build (or find in the cache) the guest image.

    powercut image build            # progress, then where the image is
    powercut image build --json     # kernel, initramfs, key, manifest paths for your own QEMU

The image is keyed by the hash of images/ and the Debian package versions it
is made from; a second build of the same recipe is a cache hit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from harness.vm.image import REPO_IMAGES, build

NAME = "image"
HELP = "build the guest image (kernel + initramfs) from Debian packages, cached by recipe hash"


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help=HELP, description=HELP)
    b.add_argument("--json", action="store_true", help="print the image's paths as JSON")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument(
        "--recipe",
        type=Path,
        default=REPO_IMAGES,
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


def run(args: argparse.Namespace) -> int:
    err = Console(stderr=True)
    with err.status("building the guest image") as status:
        result = build(
            args.recipe,
            args.cache,
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
    out.print(f"  ssh key    {image.ssh_key}")
    out.print(f"  manifest   {image.manifest}")
    out.print(f"  append     {image.cmdline}")
    return 0
