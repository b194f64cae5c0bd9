"""powercut installed from a wheel, as a new user gets it, used from a directory of their own.

The wheel is built from a copy of the sources (so the checkout gets no build/
or egg-info), installed with `--no-deps` into a fresh virtual environment
whose dependencies come from this environment's site-packages (a path in a
.pth file: no download, and this environment's editable powercut stays out
of sight). Then, from a temporary directory that is not the checkout:
`powercut setup --check`, `powercut image build` (the recipe from package
data), `powercut run matrix` (a shipped scenario by name, one real cell), and
a user's pytest file with the plugin (`power_cut`, `pytest.mark.vm` under
`--strict-markers`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

ROOT = Path(__file__).parents[2]
SOURCES = ("pyproject.toml", "README.md", "harness", "images", "scenarios")
CELL = "writethrough/host-power-cut.lose-all/ack-records/after-200-acked/r0"

USER_TEST = """
import pytest

pytestmark = pytest.mark.vm


def test_my_counter_survives_a_host_power_cut(power_cut):
    guest = power_cut.boot(mode="writethrough", ext4=True)
    guest.check_output("mount /dev/vda /mnt && for i in 1 2 3; do echo $i >> /mnt/c; done && sync")
    cut = power_cut(fault="host", policy="lose-all", seed=1)
    assert cut.ok, cut.oracle.summary()
    guest = power_cut.reboot()
    assert guest.check_output("mount /dev/vda /mnt && cat /mnt/c").split() == ["1", "2", "3"]
"""


def _run(argv: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                src / name,
                symlinks=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(src)], work)
    return next(dist.glob("powercut-*.whl"))


def make_venv(env: Path, *, with_pip: bool = False) -> Path:
    """A fresh environment whose dependencies are this one's (no download), without powercut."""
    base = getattr(sys, "_base_executable", sys.executable)
    work = env.parent
    _run([base, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(env)], work)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(_run([str(env / "bin" / "python"), "-c", where], work).stdout.strip())
    # This environment's packages (rich, paramiko, pytest, ...) as the new one's dependencies,
    # each site directory seen through links that leave this environment's own powercut out:
    # pip would take its dist-info for an installed powercut and install nothing.
    ours = _powercut_entries()
    deps = []
    for number, site_dir in enumerate(map(Path, site.getsitepackages())):
        if not site_dir.is_dir():
            continue
        view = env / f"deps-{number}"
        view.mkdir()
        for entry in site_dir.iterdir():
            if entry.name not in ours and not entry.name.endswith(".pth"):
                (view / entry.name).symlink_to(entry)
        deps.append(str(view))
    (purelib / "_powercut_deps.pth").write_text("\n".join(deps) + "\n")
    return env


def _powercut_entries() -> set[str]:
    """Top-level names in site-packages that belong to this environment's powercut."""
    files = importlib.metadata.distribution("powercut").files or []
    return {file.parts[0] for file in files} | {"harness"}


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = make_venv(tmp_path_factory.mktemp("installed") / "venv")
    pip = [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python")]
    _run([*pip, "install", "-q", "--no-deps", str(wheel)], env.parent)
    return env


def test_the_wheel_holds_the_recipe_and_the_scenarios(venv: Path, tmp_path: Path) -> None:
    probe = (
        "import harness, json; from harness.vm.recipe import recipe_dir;"
        "from harness.scenario.shipped import shipped_names;"
        "print(json.dumps([harness.__file__, str(recipe_dir()), shipped_names()]))"
    )
    out = _run([str(venv / "bin" / "python"), "-c", probe], tmp_path).stdout
    module, recipe, names = json.loads(out)
    assert module.startswith(str(venv)), f"harness imported from {module}, not the wheel"
    assert recipe.startswith(str(venv)) and (Path(recipe) / "recipe.toml").is_file()
    for sub in ("init", "rootinit", "guest-src/ackrecords.c", "guest-src/fsmeta.c"):
        assert (Path(recipe) / sub).is_file(), sub
    assert {"matrix", "guest-crash", "backend-crash", "lying-flush"} <= set(names)


def test_setup_image_build_run_and_a_users_pytest_file_work_from_the_wheel(
    venv: Path, tmp_path: Path, powercut_accel: Any
) -> None:
    bin_ = venv / "bin"
    _run([str(bin_ / "powercut"), "setup", "--check"], tmp_path)
    built = json.loads(_run([str(bin_ / "powercut"), "image", "build", "--json"], tmp_path).stdout)
    assert Path(built["kernel"]).exists(), built
    accel = ["--accel", powercut_accel.value]
    _run(
        [str(bin_ / "powercut"), "run", "matrix", "--out", "out", "--cell", CELL, *accel],
        tmp_path,
    )
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [c["verdict"] for c in results["cells"]] == ["pass"], results["cells"][0]["reason"]
    assert results["scenarios"][0]["path"].startswith(str(venv))
    (tmp_path / "test_mine.py").write_text(USER_TEST)
    pytest_ = [str(bin_ / "python"), "-m", "pytest", "-p", "no:cacheprovider"]
    tested = _run([*pytest_, "test_mine.py", "--strict-markers", "-q", *accel], tmp_path)
    assert "1 passed" in tested.stdout and "Unknown pytest.mark" not in tested.stdout


# -- the CI templates, run as a user's CI would run them ----------------------------------------

PIPELINES = ROOT / "ci" / "pipelines"
USER_SCENARIO = """
name = "mine"
modes = ["writeback", "writethrough"]
timeout = 240
[[fault]]
model = "guest-power-cut"
[[workload]]
kind = "ack-records"
sync = "fsync"
[workload.cut]
after-acked-writes = 50
"""


def _shell(script: str, cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, f"{script}\n{result.stdout}\n{result.stderr}"


def _user_repo(base: Path, wheel: Path, accel: str) -> tuple[Path, dict[str, str]]:
    """A user's checkout: their scenario, not powercut's tree; the template's venv made ready."""
    repo = base / "their-repo"
    repo.mkdir()
    (repo / "mine.toml").write_text(USER_SCENARIO)
    # Made before the template's `python3 -m venv` (which keeps it), with its own pip.
    venv = make_venv(base / "opt-powercut", with_pip=True)
    # The container's python3 is the Python this environment was made from.
    bin_ = base / "bin"
    bin_.mkdir()
    (bin_ / "python3").symlink_to(getattr(sys, "_base_executable", sys.executable))
    env = {
        "PATH": f"{bin_}:{os.environ['PATH']}",
        "POWERCUT_VENV": str(venv),
        "POWERCUT_SPEC": str(wheel),
        "PIP_NO_DEPS": "1",  # the dependencies are there already (make_venv)
        "POWERCUT_ACCEL": accel,
    }
    return repo, env


def _check_published(repo: Path, paths: list[str]) -> None:
    for path in paths:
        found = list(repo.glob(path.rstrip("/")))
        assert found, f"the template publishes {path}, which the run did not make"


def _untied(text: str) -> None:
    for tied in ("ci/bootstrap", ".venv/", "scenarios/matrix.toml", "out/matrix/*.png"):
        assert tied not in text, f"the template needs powercut's own checkout: {tied}"


def test_the_github_actions_template_shards_merges_and_publishes(
    wheel: Path, tmp_path: Path, powercut_accel: Any
) -> None:
    import yaml

    text = (PIPELINES / "github-actions.yml").read_text()
    _untied(text)
    doc = yaml.safe_load(text)
    repo, env = _user_repo(tmp_path, wheel, powercut_accel.value)
    env |= {k: v for k, v in doc["env"].items() if k not in env}
    env["POWERCUT_SCENARIOS"] = "mine.toml"
    cells = doc["jobs"]["cells"]
    shards = cells["strategy"]["matrix"]["shard"]
    for shard in shards:
        for step in cells["steps"]:
            if "run" not in step or step.get("name") == "Debian prerequisites":
                continue
            step_env = {
                k: str(v)
                .replace("${{ matrix.shard }}", str(shard))
                .replace("${{ strategy.job-total }}", str(len(shards)))
                for k, v in step.get("env", {}).items()
            }
            _shell(step["run"], repo, {**env, **step_env})
        upload = next(s for s in cells["steps"] if s.get("uses", "").startswith("actions/upload"))
        path = upload["with"]["path"].replace("${{ matrix.shard }}", str(shard))
        _check_published(repo, [path])
        # What actions/download-artifact@v4 with `pattern` and `path: shards` makes of it.
        name = upload["with"]["name"].replace("${{ matrix.shard }}", str(shard))
        shutil.copytree(repo / path, repo / "shards" / name)
    env["GITHUB_STEP_SUMMARY"] = str(tmp_path / "summary.md")
    report = doc["jobs"]["report"]
    for step in report["steps"]:
        if "run" in step and step.get("name") != "Debian prerequisites":
            _shell(step["run"], repo, env)
    publish = next(s for s in report["steps"] if s.get("name") == "Publish the report")
    _check_published(repo, publish["with"]["path"].split())
    merged = json.loads((repo / "out" / "merged" / "results.json").read_text())
    assert [c["verdict"] for c in merged["cells"]] == ["pass", "pass"]
    assert "powercut results" in (tmp_path / "summary.md").read_text()
    assert not list(repo.rglob("*.img")), "passing cells keep no disk images"


def _gitlab_script(lines: list[Any]) -> str:
    flat: list[str] = []
    for line in lines:
        flat += line if isinstance(line, list) else [line]
    return "\n".join(line for line in flat if not line.startswith("apt-get"))


def test_the_gitlab_template_shards_merges_and_publishes(
    wheel: Path, tmp_path: Path, powercut_accel: Any
) -> None:
    import yaml

    text = (PIPELINES / "gitlab-ci.yml").read_text()
    _untied(text)
    doc = yaml.safe_load(text)
    repo, env = _user_repo(tmp_path, wheel, powercut_accel.value)
    env |= {k: v for k, v in doc["variables"].items() if k not in env}
    env["POWERCUT_SCENARIOS"] = "mine.toml"
    cells = doc["powercut-cells"]
    total = int(cells["parallel"])
    for index in range(1, total + 1):
        node = {"CI_NODE_INDEX": str(index), "CI_NODE_TOTAL": str(total)}
        _shell(_gitlab_script(cells["script"]), repo, {**env, **node})
    _check_published(repo, cells["artifacts"]["paths"])
    report = doc["powercut-report"]
    assert report["needs"] == ["powercut-cells"]
    _shell(_gitlab_script(report["script"]), repo, env)
    _check_published(repo, report["artifacts"]["paths"])
    _check_published(repo, [report["artifacts"]["reports"]["junit"]])
    merged = json.loads((repo / "out" / "merged" / "results.json").read_text())
    assert [c["verdict"] for c in merged["cells"]] == ["pass", "pass"]
