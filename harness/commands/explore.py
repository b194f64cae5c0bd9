"""`powercut explore SCENARIO... --out DIR`: hundreds of crash states from one recorded run.

    powercut explore scenarios/nobarrier.toml --out out/explore
    powercut explore scenarios/matrix.toml --out r --mode writeback --max-states 500 --workers 2
    powercut explore replay out/explore --state p12-torn-3 --out state.img

Each cell's workload runs once (`harness.crash.explore_record`); the states its
contract allows are checked host-side and in one checker guest, failing ones
shrunk (`harness.crash.explore_run`). DIR gets explore.json (written as it
goes), report.html and plots/. `replay` rebuilds any state of DIR/explore.json
(minimized ones too) as an image to mount or fsck.

Exit status: 0 when no state breaks its contract (a negative control: when
one fails), 1 otherwise, 130 after Ctrl-C (explore.json keeps what was checked).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.status import Status

from harness.crash.explore_record import unexplorable
from harness.crash.explore_run import (
    CellExplorer,
    ExploreDoc,
    ExploreOptions,
    exploration_cells,
    explore_id,
    replay,
    spec_for,
)
from harness.crash.images import CellImages
from harness.crash.plan import ACCELS, command_line, make_plan
from harness.errors import ConfigError
from harness.report.explore import render_explore
from harness.vm.accel import choose_accel

NAME = "explore"
HELP = "check every crash state a recorded run allows (and `explore replay` one of them)"


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenarios",
        nargs="+",
        metavar="SCENARIO",
        help="scenario files (TOML); or `replay DIR` to rebuild one explored state",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="results directory (explore.json, report.html); with replay: the image to write "
        "(required, except with --list)",
    )
    parser.add_argument("--state", metavar="ID", help="replay: the state's id (or N/ID: cell N's)")
    parser.add_argument(
        "--mode", action="append", metavar="M", dest="modes", help="only these cache modes"
    )
    parser.add_argument(
        "--seed", type=int, metavar="S", help="scenario seed (overrides the files')"
    )
    parser.add_argument(
        "--cell", metavar="ID", help="only the cells whose exploration id starts with this"
    )
    parser.add_argument("--accel", choices=ACCELS, default="auto", help="QEMU accelerator")
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="host-side checkers at once (default 1)"
    )
    parser.add_argument(
        "--max-states",
        type=int,
        metavar="N",
        help="states per cell (overrides [explore] max-states)",
    )
    parser.add_argument(
        "--host-only", action="store_true", help="check host-side only (no checker guest)"
    )
    parser.add_argument(
        "--verify-every",
        type=int,
        default=0,
        metavar="N",
        help="read the checker guest's whole disk before every Nth check and compare it with "
        "the state (proves nothing of one state reaches the next; slow)",
    )
    parser.add_argument("--kernel", metavar="PATH", help="boot every guest on this kernel")
    parser.add_argument("--modules", metavar="DIR", help="the --kernel's lib/modules/VERSION tree")
    parser.add_argument("--list", action="store_true", help="list the cells to explore and exit")


def run(args: argparse.Namespace) -> int:
    console = Console()
    if args.scenarios[0] == "replay":
        return _replay(args, console)
    if args.state is not None:
        raise ConfigError("--state is for `powercut explore replay DIR --state ID --out IMAGE`")
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: at least 1")
    if args.out is None and not args.list:
        raise ConfigError(
            "--out DIR is required: the results directory (explore.json, report.html, the "
            "recordings); only --list runs without one"
        )
    plan = make_plan(
        args.scenarios,
        args.out if args.out is not None else ".",  # --list writes nothing
        modes=args.modes,
        seed=args.seed,
        accel=args.accel,
        kernel=args.kernel,
        modules=args.modules,
    )
    cells = exploration_cells(plan.scenarios, plan.cells)
    if args.cell:
        cells = [c for c in cells if explore_id(c).startswith(args.cell)]
        if not cells:
            raise ConfigError(f"--cell {args.cell!r} matches no cell to explore (try --list)")
    skipped = [(c, why) for c in cells if (why := unexplorable(c))]
    cells = [c for c in cells if not unexplorable(c)]
    if args.list:
        for c in cells:
            console.print(f"{c.scenario}: {explore_id(c)}  seed={c.seed}", markup=False)
        for c, why in skipped:
            console.print(f"{c.scenario}: {explore_id(c)}  skipped: {why}", markup=False)
        return 0
    if not cells:
        raise ConfigError(f"no cell can be explored: {skipped[0][1]}")
    options = ExploreOptions(
        workers=args.workers,
        guest=False if args.host_only else None,
        max_states=args.max_states,
        verify_every=max(0, args.verify_every),
    )
    for c in cells:  # a bad budget is an error before anything boots
        CellExplorer.check_budget(spec_for(c, plan.scenarios), options)
    images = CellImages()
    with console.status("guest image"):
        images.prepare(cells)
    accel = choose_accel(None if plan.accel == "auto" else plan.accel, images(cells[0]).kernel)
    out = Path(args.out)
    doc = ExploreDoc(out, command_line(sys.argv[1:]))
    for c, why in skipped:
        console.print(f"[yellow]SKIP [/] {c.scenario}: {explore_id(c)}: {why}", soft_wrap=True)
        skip = {"id": explore_id(c), "scenario": c.scenario, "status": "skipped", "reason": why}
        doc.add_cell({**skip, "index": len(doc.data["cells"]), "verdict": "skipped", "states": []})
    interrupted = False
    try:
        for index, cell in enumerate(cells, start=len(skipped)):
            prefix = f"{index}/" if len(cells) + len(skipped) > 1 else None
            label = f"{cell.scenario}: {explore_id(cell)}"
            with console.status(label) as status:

                def phase(name: str, label: str = label, status: Status = status) -> None:
                    status.update(f"{label}: {name}")

                explorer = CellExplorer(
                    cell,
                    spec_for(cell, plan.scenarios),
                    out / "cells" / f"{index:03d}",
                    images(cell),
                    out=out,
                    index=index,
                    options=options,
                    accel=accel,
                    doc=doc,
                    replay_prefix=prefix,
                    on_phase=phase,
                )
                result = explorer.run()
            entry = result.entry
            style = "green" if result.ok else "red"
            console.print(
                f"[{style}]{str(entry['verdict']).upper():5}[/] {cell.scenario}: {entry['id']}: "
                f"{entry['reason']}",
                highlight=False,
                soft_wrap=True,
            )
    except KeyboardInterrupt:
        interrupted = True
    doc.finish(interrupted=interrupted)
    report = render_explore(out, doc.data)
    data = doc.data
    console.print(
        f"{data['states_explored']} states explored ({data['states_unique']} unique), "
        f"{data['states_failing']} failing, {data['states_breaking_contract']} breaking the "
        f"contract; {out / 'explore.json'}, {report}",
        markup=False,
    )
    for cell_entry in data["cells"]:
        shown = [s for s in cell_entry.get("states", []) if s.get("contract_broken")][:3]
        for s in shown:
            console.print(f"  {s['id']}: {s.get('replay', '')}", markup=False, soft_wrap=True)
    if interrupted:
        return 130
    return 0 if data["ok"] else 1


def _replay(args: argparse.Namespace, console: Console) -> int:
    if len(args.scenarios) != 2:
        raise ConfigError("usage: powercut explore replay DIR --state ID --out IMAGE")
    if not args.state:
        raise ConfigError("replay needs --state ID (explore.json names every state)")
    if not args.out:
        raise ConfigError("replay needs --out IMAGE (the file to write the state to)")
    image = replay(args.scenarios[1], args.state, args.out)
    console.print(f"state {args.state} written to {image}", markup=False)
    return 0
