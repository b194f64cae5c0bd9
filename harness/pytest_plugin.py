"""powercut's pytest plugin: fixtures, markers, options, and scenario files as tests.

Registered through the `pytest11` entry point, so any project that installs
powercut gets `guest_image`, `vm_factory`, `vm`, `guest`, `power_cut` and
`powercut_disk`, the markers `vm`, `libvirt` and `soak` (registered here, so
`--strict-markers` accepts them), its options in `pytest --help` (group
"powercut"), and scenario TOML files collected as tests, one per cell
(`harness.pytest_scenarios`). A failing test that booted machines gets
their console logs (and any backend log registered with `vm_factory.add_log`)
attached to its report; at the end of the session every process, socket and
temporary directory the fixtures created must be gone, or the session fails.

Under pytest-xdist (`-n N`) every worker builds or finds the same cached
images (one builder at a time, by a lock in the image cache), probes KVM one
at a time, and gives its cells their own ports, sockets and directories; the
controller writes the scenario results; and tests marked `libvirt` go to
one worker (`xdist_group`, with `--dist loadgroup`, which `-n` alone
selects here), since the libvirt daemon a worker starts ends with it.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import hygiene
from harness import pytest_scenarios as scenarios
from harness.proc import live_processes

# A powercut backend on a disk image (mode, queues, serial, fault drivers via a
# --blockdev graph); composes with vm_factory.
from harness.testing.disk import powercut_disk  # noqa: F401
from harness.vm.accel import ACCEL_CHOICES

log = logging.getLogger(__name__)

_LOG_TAIL_LINES = 200
# Work dirs created through the fixtures; each must be gone at session end unless kept.
_created_dirs: set[Path] = set()
_kept_dirs: set[Path] = set()
_BEFORE = pytest.StashKey[tuple[set[Any], set[Path]]]()
_HYGIENE_MARK = pytest.StashKey[int]()

MARKERS = (
    "vm: boots real QEMU guests (deselect with -m 'not vm')",
    "libvirt: needs a libvirt daemon (run in one xdist worker)",
    "soak: long soak runs, skipped unless --soak is given",
)
LIBVIRT_GROUP = "powercut-libvirt"
_SCENARIO_RESULTS = pytest.StashKey[Any]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("powercut")
    group.addoption(
        "--soak", action="store_true", default=False, help="also run tests marked soak (long runs)"
    )
    group.addoption(
        "--accel",
        default=None,
        choices=ACCEL_CHOICES,
        help="accelerator for test VMs (default: $POWERCUT_ACCEL, else probe)",
    )
    group.addoption(
        "--guest-package",
        action="append",
        default=[],
        metavar="NAME",
        help="a Debian package to add to the guest image (repeatable)",
    )
    group.addoption(
        "--guest-kernel", default=None, metavar="PATH", help="boot test guests with this kernel"
    )
    group.addoption(
        "--guest-modules", default=None, metavar="PATH", help="its lib/modules/RELEASE tree"
    )
    group.addoption(
        "--keep-failed",
        action="store_true",
        default=False,
        help="keep the work dirs (console logs, disks) of failed VM tests",
    )
    scenarios.add_options(parser)


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Scenario TOML files: each cell a test (see harness.pytest_scenarios for which files)."""
    return scenarios.collect_file(file_path, parent)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.pluginmanager.hasplugin("xdist"):
        for item in items:
            if item.get_closest_marker("libvirt") is not None:
                item.add_marker(pytest.mark.xdist_group(LIBVIRT_GROUP))
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak test: pass --soak to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    scenarios.collection_finish(session)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(_SCENARIO_RESULTS, None)
    if results is not None:
        out = scenarios.results_dir(config)
        terminalreporter.write_line(
            f"powercut: {results.summary}; reports in {out} (report.html, report.md, "
            "junit.xml, results.json)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    report: pytest.TestReport = outcome.get_result()
    scenarios.attach_result(item, report)
    if not report.failed:
        return
    logs: dict[str, Path] = {}
    # The item and its module/session: module-scoped factories report into each test.
    for node in item.listchain():
        node._powercut_failed = True  # type: ignore[attr-defined]
        for factory in getattr(node, "_powercut_factories", []):
            logs.update(factory.all_logs())
    for name, path in logs.items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        tail = "\n".join(text.splitlines()[-_LOG_TAIL_LINES:])
        report.sections.append((f"powercut {name} ({path})", tail))


def track_dir(path: Path) -> Path:
    """Register a temporary dir that the session-end hygiene check must see removed."""
    _created_dirs.add(path)
    return path


def keep_dir(path: Path) -> None:
    _kept_dirs.add(path)


def pytest_sessionstart(session: pytest.Session) -> None:
    # What already ran before this session (an outer session, when pytest runs
    # pytest) is not this session's to judge or stop.
    session.config.stash[_BEFORE] = (set(live_processes()), set(_created_dirs))
    # Also temp dirs (harness prefixes) and unix sockets made outside the fixtures.
    session.config.stash[_HYGIENE_MARK] = hygiene.watch()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    results = scenarios.session_finish(session)
    if results is not None:
        session.config.stash[_SCENARIO_RESULTS] = results
    procs_before, dirs_before = session.config.stash.get(_BEFORE, (set(), set()))
    # Daemons we started on purpose (libvirtd when none ran) end with the session.
    libvirtd = sys.modules.get("harness.vm.libvirtd")
    if libvirtd is not None and not procs_before:
        libvirtd.stop_started_daemons()
    leaked = [p for p in live_processes() if p not in procs_before]
    dirs = sorted(str(d) for d in _created_dirs - _kept_dirs - dirs_before if d.exists())
    # pytest's own tmp_path dirs are pytest's to keep (it retains the last few runs).
    basetemp = getattr(session.config, "_tmp_path_factory", None)
    pytest_tmp = [basetemp.getbasetemp()] if basetemp is not None else []
    others = hygiene.leftovers(
        session.config.stash.get(_HYGIENE_MARK, 0), [*pytest_tmp, *_kept_dirs]
    )
    dirs += [str(p) for p in others if str(p) not in dirs]
    if not leaked and not dirs:
        return
    lines = ["powercut hygiene check FAILED: the tests left things behind"]
    lines += [f"  process {p!r}: {' '.join(p.argv)[:200]}" for p in leaked]
    lines += [f"  {'socket' if hygiene.is_socket(Path(d)) else 'directory'} {d}" for d in dirs]
    for p in leaked:
        p.stop()
    for d in dirs:
        hygiene.remove(Path(d))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True, bold=True)
    else:
        log.error("%s", "\n".join(lines))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest_image(request: pytest.FixtureRequest) -> Any:
    """The guest image for the repository's recipe, built once (and cached across runs).

    `--guest-package`, `--guest-kernel` and `--guest-modules` change what it is made of;
    `harness.vm.build.ensure_image(packages, kernel, modules)` makes others in a test.
    """
    from harness.vm.build import ensure_image

    kernel = request.config.getoption("--guest-kernel")
    modules = request.config.getoption("--guest-modules")
    return ensure_image(
        request.config.getoption("--guest-package"),
        Path(kernel) if kernel else None,
        Path(modules) if modules else None,
    )


@pytest.fixture(scope="session")
def powercut_accel(request: pytest.FixtureRequest, guest_image: Any) -> Any:
    return scenarios.choose_accel_once(request.config, guest_image.kernel)


class VMFactory:
    """Creates machines for one test (or module) and always cleans them up."""

    def __init__(self, image: Any, accel: Any, keep_failed: bool, name: str) -> None:
        self.image = image
        self.accel = accel
        self.keep_failed = keep_failed
        self.tmpdir = track_dir(Path(tempfile.mkdtemp(prefix=f"powercut-test-{name[:40]}-")))
        self.machines: list[Any] = []
        self._logs: dict[str, Path] = {}
        self._cleanups: list[Any] = []

    def spec(self, *disks: Any, cpus: int = 1, memory_mib: int = 512, name: str = "vm") -> Any:
        from harness.vm.spec import MachineSpec

        return MachineSpec.from_image(
            self.image, disks=tuple(disks), cpus=cpus, memory_mib=memory_mib, name=name
        )

    def disk_file(self, size_mib: int = 256, name: str | None = None) -> Path:
        """A sparse raw image file in this factory's temp dir."""
        path = self.tmpdir / (name or f"disk{len(list(self.tmpdir.glob('*.img')))}.img")
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        return path

    def __call__(
        self,
        *disks: Any,
        cpus: int = 1,
        memory_mib: int = 512,
        libvirt: str | None = None,
        boot: bool = True,
        name: str | None = None,
    ) -> Any:
        """A machine with `disks`; booted and SSH-ready unless boot=False."""
        name = name or f"vm{len(self.machines)}"
        spec = self.spec(*disks, cpus=cpus, memory_mib=memory_mib, name=name)
        workdir = self.tmpdir / name
        machine: Any
        if libvirt is not None:
            from harness.vm.libvirt import LibvirtMachine

            machine = LibvirtMachine(spec, uri=libvirt, workdir=workdir, accel=self.accel)
        else:
            from harness.vm.qemu import QemuMachine

            machine = QemuMachine(spec, workdir=workdir, accel=self.accel)
        self.machines.append(machine)
        if boot:
            machine.boot()
        return machine

    def add_log(self, name: str, path: Path) -> None:
        """Attach `path` (a backend's log, say) to the report if the test fails."""
        self._logs[name] = Path(path)

    def add_cleanup(self, fn: Any) -> None:
        """Call `fn()` at teardown, before machines are closed (LIFO)."""
        self._cleanups.append(fn)

    def all_logs(self) -> dict[str, Path]:
        logs = dict(self._logs)
        for m in self.machines:
            for kind, path in m.logs().items():
                logs[f"{m.spec.name} {kind}"] = path
        return logs

    def close(self, failed: bool) -> None:
        errors: list[BaseException] = []
        for m in reversed(self.machines):
            try:
                m.close()
            except Exception as exc:  # noqa: BLE001 - clean up everything, then report
                errors.append(exc)
        for fn in reversed(self._cleanups):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - clean up everything, then report
                errors.append(exc)
        if failed and self.keep_failed:
            keep_dir(self.tmpdir)
            log.warning("kept the work dir of a failed test: %s", self.tmpdir)
        else:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
        if errors:
            raise errors[0]


def _factory(request: pytest.FixtureRequest, image: Any, accel: Any) -> Iterator[VMFactory]:
    factory = VMFactory(image, accel, request.config.getoption("--keep-failed"), request.node.name)
    node: Any = request.node
    node._powercut_factories = [*getattr(node, "_powercut_factories", []), factory]
    try:
        yield factory
    finally:
        factory.close(getattr(node, "_powercut_failed", False))


@pytest.fixture
def vm_factory(
    request: pytest.FixtureRequest, guest_image: Any, powercut_accel: Any
) -> Iterator[VMFactory]:
    """`vm_factory(*disks, libvirt=None, boot=True)` → a Machine, closed after the test."""
    yield from _factory(request, guest_image, powercut_accel)


@pytest.fixture(scope="module")
def module_vm_factory(
    request: pytest.FixtureRequest, guest_image: Any, powercut_accel: Any
) -> Iterator[VMFactory]:
    """Like vm_factory, but machines live for the whole module (boots are costly under TCG)."""
    yield from _factory(request, guest_image, powercut_accel)


@pytest.fixture
def vm(vm_factory: VMFactory) -> Any:
    """A booted QEMU machine with one scratch 256 MiB disk (/dev/vda, built-in virtio-blk)."""
    from harness.vm.spec import FileDisk

    return vm_factory(FileDisk(vm_factory.disk_file(256)))


@pytest.fixture
def guest(vm: Any) -> Any:
    """The SSH session of `vm`: `guest.run(...)`, `guest.check_output(...)`."""
    return vm.ssh


@pytest.fixture
def power_cut(
    request: pytest.FixtureRequest, guest_image: Any, powercut_accel: Any
) -> Iterator[Any]:
    """Crash tests of your own: `power_cut.boot(mode=...)`, `power_cut(fault="host",
    policy="lose-all", seed=...)` → the oracle's verdict, `power_cut.reboot()`
    (harness.crash.pytest_helpers)."""
    from harness.crash.pytest_helpers import make_helper, remove_helper

    helper = make_helper(guest_image, powercut_accel, request.node.name)
    track_dir(helper.workdir)
    node: Any = request.node
    node._powercut_factories = [*getattr(node, "_powercut_factories", []), helper]
    try:
        yield helper
    finally:
        keep = getattr(node, "_powercut_failed", False) and request.config.getoption(
            "--keep-failed"
        )
        if keep:
            keep_dir(helper.workdir)
        remove_helper(helper, keep)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    if os.environ.get("POWERCUT_ACCEL") is None and config.getoption("--accel"):
        os.environ["POWERCUT_ACCEL"] = config.getoption("--accel")
    scenarios.configure(config)
    config.pluginmanager.register(scenarios.ReportHooks(config), "powercut-scenario-results")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(scenarios.XdistHooks(config), "powercut-xdist")
        # libvirt tests share one worker (see above): -n alone means --dist loadgroup here.
        if getattr(config.option, "dist", "no") == "load":
            config.option.dist = "loadgroup"
