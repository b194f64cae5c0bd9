"""The runner's pieces that need no guest: the fault graph, the offline mkfs, errors, Ctrl-C."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from harness.block import open_backend
from harness.commands.run import add_run_arguments, plan_from_args
from harness.crash import cell_run
from harness.crash import runner as runner_mod
from harness.crash.plan import RunPlan
from harness.crash.session import fault_blockdev
from harness.durability.contract import CacheMode, FaultModel, parse_fault
from harness.durability.cut import apply_cut
from harness.durability.journal import read_journal
from harness.durability.oracle import check
from harness.durability.writelog import read_log
from harness.errors import ConfigError
from harness.proc import live_processes
from harness.report.results import load_results
from harness.scenario.model import BlkdebugRule
from harness.vm.backends import ProcessBackend
from harness.vm.daemons import ServeOptions
from harness.vm.image import GuestImage
from harness.workloads.filesystem import make_disk

ROOT = Path(__file__).parents[3]
BLOCK = 4096


def plan_for(out: Path, *argv: str) -> RunPlan:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return plan_from_args(parser.parse_args([*argv, "--out", str(out), "--accel", "tcg"]))


def test_fault_graph_records_every_write_and_journals_the_volatile_ones(tmp_path: Path) -> None:
    # A comma in the directory name must survive the dotted --blockdev string.
    d = tmp_path / "a,b"
    make_disk(d / "disk.img", 1 << 20)
    spec = fault_blockdev(d / "disk.img", d / "disk.journal", d / "writes.log")
    backend = open_backend(spec, cache="writeback")
    backend.write(0, b"\x01" * BLOCK)
    backend.flush()
    backend.write(BLOCK, b"\x02" * BLOCK)  # never flushed
    backend.graph.close()
    assert [r.op.label for r in read_log(d / "writes.log").requests] == ["write", "flush", "write"]
    cut = apply_cut(d / "disk.img", d / "disk.journal", "lose-all", 1)
    assert cut.writes_reverted == 1 and cut.writes_durable == 1
    report = check(d / "disk.img", d / "writes.log", CacheMode.WRITEBACK)
    assert report.ok and report.writes_durable == 1


def test_fault_graph_with_a_lying_flush_loses_flushed_data(tmp_path: Path) -> None:
    rules = tmp_path / "blkdebug.json"
    rule = BlkdebugRule((("op", "flush"), ("action", "lying-flush")))
    rules.write_text(json.dumps([rule.to_rule().to_json()]))
    make_disk(tmp_path / "disk.img", 1 << 20)
    spec = fault_blockdev(
        tmp_path / "disk.img", tmp_path / "j", tmp_path / "w.log", blkdebug_config=rules
    )
    backend = open_backend(spec, cache="writeback")
    backend.write(0, b"\x01" * BLOCK)
    backend.flush()
    backend.graph.close()
    state, _ = read_journal(tmp_path / "j")
    assert not state.is_durable(state.preimages[0].seq), "the lying flush reached the journal"
    apply_cut(tmp_path / "disk.img", tmp_path / "j", "lose-all", 1)
    report = check(tmp_path / "disk.img", tmp_path / "w.log", CacheMode.WRITEBACK)
    assert report.lost == BLOCK // 512


def test_mkfs_runs_offline_with_the_directories_the_workload_needs(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    make_disk(image, 32 << 20, filesystem="ext4", directories=["fsmeta"])
    assert image.stat().st_size == 32 << 20
    fsck = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /", str(image)], capture_output=True, text=True, check=True
    )
    assert "fsmeta" in listing.stdout


def test_faults_have_short_names_for_users_tests() -> None:
    assert parse_fault("host") is FaultModel.HOST_POWER_CUT
    assert parse_fault("guest-power-cut") is FaultModel.GUEST_POWER_CUT
    with pytest.raises(ConfigError, match="valid: guest, host, backend"):
        parse_fault("meteor")


def test_the_backend_serves_the_fault_graph(tmp_path: Path) -> None:
    make_disk(tmp_path / "disk.img", 1 << 20)
    spec = fault_blockdev(tmp_path / "disk.img", tmp_path / "j", tmp_path / "w.log")
    options = ServeOptions(blockdev=spec, socket=tmp_path / "disk.sock", cache=CacheMode.UNSAFE)
    backend = ProcessBackend.logging_in(options, tmp_path, "disk")
    try:
        backend.start()
        assert backend.stats()["connected"] is False
        assert (tmp_path / "w.log").exists() and (tmp_path / "j").exists()
    finally:
        backend.stop()
    assert "--blockdev" in backend.argv() and str(tmp_path / "disk.img") not in backend.argv()


def _broken_image(tmp_path: Path) -> GuestImage:
    """An image whose kernel does not exist: QEMU cannot start, the cell must be an error."""
    key = tmp_path / "host_key.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG8g\n")
    return GuestImage(
        directory=tmp_path,
        recipe_hash="0",
        kernel=tmp_path / "no-such-kernel",
        bzimage=tmp_path / "no-such-kernel",
        initramfs=tmp_path / "no-such-initramfs",
        ssh_key=tmp_path / "id",
        ssh_public_key=tmp_path / "id.pub",
        host_public_key=key,
        manifest=tmp_path / "manifest.json",
        cmdline="console=ttyS0",
        ssh_port=22,
        fio_server_port=8765,
    )


def test_a_cell_that_cannot_boot_is_an_error_with_its_logs_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    plan = plan_for(
        out,
        str(ROOT / "scenarios" / "unsafe-loses-data.toml"),
    )
    outcome = runner_mod.run_plan(plan, command="powercut run test", image=_broken_image(tmp_path))
    assert not outcome.ok and not live_processes()
    cell = load_results(out).cells[0]
    assert cell.verdict == "error" and "QEMU did not start" in cell.reason, cell.reason
    assert cell.reproduce.startswith("powercut run ") and "--cell unsafe/" in cell.reproduce
    assert (out / cell.artifacts["backend_log"]).exists()
    assert {"junit.xml", "report.html", "report.md"} <= {p.name for p in out.iterdir()}


def test_ctrl_c_stops_the_run_marks_the_rest_skipped_and_still_writes_the_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    plan = plan_for(out, str(ROOT / "scenarios" / "matrix.toml"), "--mode", "unsafe")

    def interrupted(self: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cell_run.CellRunner, "run", interrupted)
    outcome = runner_mod.run_plan(plan, command="powercut run test", image=_broken_image(tmp_path))
    assert outcome.interrupted and not outcome.ok
    verdicts = [c.verdict for c in load_results(out).cells]
    assert verdicts == ["skipped", "skipped"]
    assert "interrupted" in load_results(out).cells[0].reason


def test_cells_keep_their_own_directories(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, str(ROOT / "scenarios" / "matrix.toml"))
    dirs = {plan.cell_directory(i, c) for i, c in enumerate(plan.cells)}
    assert len(dirs) == len(plan.cells)


def test_a_fio_cell_cut_by_count_is_refused_before_booting(tmp_path: Path) -> None:
    scenario = tmp_path / "fio-count.toml"
    scenario.write_text(
        'name = "fio-count"\n[[fault]]\nmodel = "host-power-cut"\n'
        '[[workload]]\nkind = "fio-verify"\n[cut]\nafter-flushes = 10\n'
    )
    out = tmp_path / "out"
    outcome = runner_mod.run_plan(
        plan_for(out, str(scenario)), command="t", image=_broken_image(tmp_path)
    )
    cell = outcome.results.cells[0]
    assert cell.verdict == "error" and "cut by time" in cell.reason, cell.reason
    assert not list(out.rglob("disk.img")), "a disk was made for a cell that cannot run"
