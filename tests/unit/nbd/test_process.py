"""`powercut serve --nbd` in its own process (ProcessBackend on ServeOptions): QEMU's own
format driver over an NBD connection to a crash-test graph."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from harness.vm.backends import ProcessBackend
from harness.vm.daemons import ServeOptions

from .conftest import CLI, canary, need, run_tool

GRAPH = (
    "driver=log-writes,log={d}/w.log,file.driver=powerfail,file.journal={d}/d.journal,"
    "file.file.driver=raw,file.file.file.driver=file,file.file.file.filename={d}/disk.img"
)


def export(tmp_path: Path, name: str = "nbd") -> ProcessBackend:
    run = tmp_path / "run"
    options = ServeOptions(blockdev=GRAPH.format(d=tmp_path), nbd=str(run / f"{name}.sock"))
    return ProcessBackend.logging_in(options, run, name)


def test_qemu_qcow2_over_the_export_sends_fua_and_flushes_into_the_write_log(
    tmp_path: Path,
) -> None:
    need("qemu-img")
    need("qemu-io")
    (tmp_path / "disk.img").write_bytes(canary())
    nbd = export(tmp_path)
    socket = nbd.options.sockets()[0]
    uri = nbd.options.nbd_uri
    with nbd:
        nbd.start()
        assert nbd.running and socket.exists()
        run_tool(["qemu-img", "create", "-f", "qcow2", uri, "4M"])
        opts = (
            f"driver=qcow2,file.driver=nbd,file.server.type=unix,"
            f"file.server.path={socket},file.export=disk"
        )
        # writethrough: qcow2 cannot pass FUA down, so QEMU emulates it with flushes ...
        run_tool(
            ["qemu-io", "-t", "writethrough", "--image-opts", "-c", "write -P 0x77 0 64k", opts]
        )
        # ... while raw passes it through: NBD_CMD_WRITE with FUA (SEND_FUA is advertised)
        run_tool(["qemu-io", "-f", "raw", "-t", "writethrough", "-c", "write -P 1 7M 4k", uri])
        assert "qcow2" in run_tool(["qemu-img", "info", uri])
    assert not socket.exists()
    out = subprocess.run(
        [*CLI, "log", "show", "--json", str(tmp_path / "w.log")],
        capture_output=True,
        text=True,
        check=True,
    )
    log = json.loads(out.stdout)
    fua = [(e["op"], e["offset"], e["length"]) for e in log["entries"] if e["fua"]]
    assert fua == [("write", 7 << 20, 4096)]  # the raw writethrough write, and only it
    assert log["by_op"]["flush"] > 0
    assert log["failed"] == 0 and log["in_flight"] == 0


def test_a_frozen_export_can_be_killed_like_a_host_power_cut(tmp_path: Path) -> None:
    need("qemu-io")
    (tmp_path / "disk.img").write_bytes(canary())
    nbd = export(tmp_path, "cut")
    try:
        nbd.start()
        run_tool(
            [
                "qemu-io",
                "-f",
                "raw",
                "-t",
                "writeback",
                "-c",
                "write -P 1 0 4k",
                nbd.options.nbd_uri,
            ]
        )
        nbd.freeze()
        nbd.kill()
        assert not nbd.running
    finally:
        nbd.stop()
    run_tool(
        [
            *CLI,
            "cut",
            str(tmp_path / "disk.img"),
            "--journal",
            str(tmp_path / "d.journal"),
            "--policy",
            "lose-all",
        ]
    )
    # qemu-io flushed when it closed the image: the write was durable before the cut
    assert (tmp_path / "disk.img").read_bytes()[:4096] == b"\x01" * 4096
