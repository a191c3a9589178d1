"""Sweeps (isvit_viz.sweep): grid specs, the serial fallback, Ray tasks on a local 2-CPU cluster,
resume, failed cells, the report, and bad input at the command line.

Tiny cells (embedded ViT, 16 calibration images, 1 iteration, 64 test images) are deterministic on
the CPU, so a Ray run must reproduce the serial run's numbers exactly. `make test` installs Ray
(the ``sweep`` extra); the Ray tests skip only where it is not installed. The command-line tests run
``isvit-viz sweep`` as its own process: interrupted (SIGKILL, SIGINT) and rerun, on a Ray instance it
starts itself, and on an existing Ray head (another process) through ``--address`` and ``$RAY_ADDRESS``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from isvit_viz.cli import main
from isvit_viz.results import merge, render
from isvit_viz.sweep import Cell, SweepFolder, SweepSpec, load_spec, run_cell, run_sweep, sweep_report
from isvit_viz.sweep.runner import INSTALL_HINT

TINY = {"models": ["vit"], "methods": ["minmax", "repq-vit"], "bits": [3, 4], "seeds": [0], "calib": 16, "iters": 1, "test": 64}
#: a cell's results (deterministic on the CPU; times and memory are not)
NUMBERS = ("fp_top1", "q_top1", "agree_top1", "kl_to_fp")
HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="ray is not installed (`make test` installs it: the [sweep] extra)")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return port


def _flags(**change) -> list[str]:
    """The tiny grid (with ``change``) as ``isvit-viz sweep`` flags."""
    out = []
    for k, v in (TINY | change).items():
        out += [f"--{k.replace('_', '-')}", *map(str, v if isinstance(v, list) else [v])]
    return out


def _cli(out: Path, *flags: str, **change) -> list[str]:
    """``isvit-viz sweep`` over the tiny grid into ``out``, as a command for a new process."""
    return [sys.executable, "-m", "isvit_viz.cli", "sweep", *_flags(**change), "--quiet", "--out", str(out), *flags]


def _env(**extra: str) -> dict[str, str]:
    """This environment without $RAY_ADDRESS (each test says where Ray is), offline, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | extra


def _failures(out: Path) -> list[str]:
    """The failed cells' errors and tracebacks (for assertion messages)."""
    return [p.read_text() for p in sorted((out / "failed").glob("*.json"))]


def _last_log(out: Path) -> dict:
    return json.loads((out / "log.jsonl").read_text().splitlines()[-1])


def _interrupt_after_first_cell(cmd: list[str], out: Path, sig: int, log: Path, timeout: float = 300.0) -> tuple[int, dict]:
    """Start ``cmd``, send ``sig`` as soon as a cell's result exists; its exit status and the results then."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while not list((out / "cells").glob("*.json")):  # atomic writes: a visible result is complete
                assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before any cell: {log.read_text()}"
                assert time.monotonic() < deadline, "no cell finished in time"
                time.sleep(0.02)
            proc.send_signal(sig)
            status = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    return status, {p.name: p.read_bytes() for p in (out / "cells").glob("*.json")}


def _assert_nothing_half_written(out: Path, orphans_allowed: bool) -> None:
    """Every file a reader opens parses; a write cut by SIGKILL can leave only a hidden ``.*.tmp``
    (the atomic write's temp file, read by nothing), and SIGINT leaves none."""
    for p in out.rglob("*"):
        if p.name.endswith(".tmp"):
            assert orphans_allowed and p.name.startswith("."), p
        elif p.suffix == ".json":
            assert json.loads(p.read_text()), p
        elif p.suffix == ".jsonl":
            assert all(json.loads(line) for line in p.read_text().splitlines()), p


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone too
    except OSError:
        return False


# ----------------------------------------------------------------------------- spec
def test_spec_expands_the_grid_in_order_with_canonical_names():
    spec = SweepSpec(models=["embedded-vit", "swin"], methods=["minmax", "isvit"], bits=[3, 4, 3], seeds=[0, 1]).normalized()
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 2  # the duplicate bit-width is dropped
    assert cells[0] == Cell("vit", "minmax", 3, 3, 0) and cells[0].key == "vit_minmax_w3a3_s0"
    assert cells[1].key == "vit_minmax_w3a3_s1" and cells[-1].key == "swin_isvit_w4a4_s1"
    assert len({c.key for c in cells}) == len(cells)


def test_spec_file_yaml_and_json_agree(tmp_path):
    (tmp_path / "g.yaml").write_text(
        "models: vit\nmethods: [minmax, repq-vit]\nbits: [3, 4]\nseeds: 0\ncalib: 16\niters: 1\ntest: 64\n"
    )
    (tmp_path / "g.json").write_text(json.dumps(TINY))
    assert load_spec(tmp_path / "g.yaml") == load_spec(tmp_path / "g.json") == SweepSpec(**TINY)


@pytest.mark.parametrize(
    "change, message",
    [({"iters": 2}, "iters=1, this sweep has iters=2"),
     ({"matmul_dtype": "bfloat16"}, "matmul_dtype='float32', this sweep has matmul_dtype='bfloat16'")],
)  # fmt: skip
def test_folder_refuses_cells_run_with_other_settings(change, message, tmp_path):
    # bf16 and fp32 cells would be averaged into one row of the report: the dtype guards a resume too
    SweepFolder(tmp_path / "s").prepare(SweepSpec(**TINY).normalized())
    with pytest.raises(ValueError, match=message):
        run_sweep(SweepSpec(**(TINY | change)), tmp_path / "s", backend="serial", progress=False)
    assert not list((tmp_path / "s" / "cells").iterdir())
    assert main(["sweep", "--out", str(tmp_path / "s"), *_flags(**change)]) == 2  # the CLI: one line, exit 2


# ----------------------------------------------------------------------------- bad input at the CLI
BAD = {
    "empty grid": (["--models"], "empty grid: no models"),
    "unknown method": (["--methods", "isvitt"], "unknown method 'isvitt'"),
    "unknown model": (["--models", "deit_small"], "unknown model 'deit_small'"),
    "bad yaml": (["--spec", "{tmp}/bad.yaml"], "bad.yaml: not a valid spec file"),
    "bad json": (["--spec", "{tmp}/bad.json"], "bad.json: not a valid spec file"),
    "unknown key": (["--spec", "{tmp}/key.yaml"], "unknown spec key(s) ['modles']"),
    "unreachable address": (["--address", "127.0.0.1:{port}"], "is unreachable"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2_before_any_cell(case, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("models: [vit\nbits: 3\n")
    (tmp_path / "bad.json").write_text('{"models": ["vit"],}')
    (tmp_path / "key.yaml").write_text("modles: [vit]\n")
    argv, needle = BAD[case]
    argv = [a.format(tmp=tmp_path, port=_closed_port()) for a in argv]
    out = tmp_path / "sweep"
    assert main(["sweep", "--out", str(out), "--methods", "minmax", "--bits", "4", "--seeds", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("isvit-viz: error: ") and needle in err[0], err
    assert not out.exists()  # nothing started


# ----------------------------------------------------------------------------- the serial fallback (no Ray)
@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    """The tiny grid run with ``import ray`` failing: the serial fallback, the reference numbers."""
    out = tmp_path_factory.mktemp("serial")
    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
        summary = run_sweep(SweepSpec(**TINY), out, progress=False, log=messages.append)
    return out, summary, messages, sweep_report(out)


def test_serial_fallback_without_ray(serial, capsys):
    out, summary, messages, report = serial
    assert messages == [INSTALL_HINT] and "pip install 'isvit_viz[sweep]'" in INSTALL_HINT
    assert (summary.backend, summary.done, summary.failed, summary.skipped) == ("serial", 4, 0, 0)
    files = sorted((out / "cells").glob("*.json"))
    assert [f.stem for f in files] == ["vit_minmax_w3a3_s0", "vit_minmax_w4a4_s0", "vit_repq-vit_w3a3_s0", "vit_repq-vit_w4a4_s0"]
    payload = json.loads(files[0].read_text())
    (run,) = payload["runs"]
    assert (run["model"], run["method"], run["w_bits"], run["a_bits"], run["seed"]) == ("vit", "minmax", 3, 3, 0)
    assert (run["calib_images"], run["iters"], run["n"]) == (16, 0, 64)  # minmax: calibration only
    assert payload["settings"]["matmul_dtype"] == "float32" and payload["env"]["threads"] == 1
    # the report is benchmarks.report's table over the folder, and the CLI prints the same
    assert report == render(merge(files)) and (out / "report.md").read_text() == report + "\n"
    assert report.count("| embedded-vit |") == 2 and "CPU x1 fp32" in report
    assert main(["sweep", "report", str(out)]) == 0
    assert capsys.readouterr().out == report + "\n"


def test_cell_numbers_are_run_grid_numbers(serial):
    # one cell in this process gives the numbers the sweep stored (deterministic on the CPU)
    out, *_ = serial
    spec = SweepSpec(**TINY).normalized()
    rec = run_cell(spec, Cell("vit", "repq-vit", 4, 4, 0))["runs"][0]
    stored = json.loads((out / "cells" / "vit_repq-vit_w4a4_s0.json").read_text())["runs"][0]
    assert {k: rec[k] for k in ("q_top1", "agree_top1", "kl_to_fp")} == {
        k: stored[k] for k in ("q_top1", "agree_top1", "kl_to_fp")
    }


def test_killed_sweep_reruns_only_the_remaining_cells(serial, tmp_path):
    # SIGKILL right after the first result: no clean-up runs, yet the rerun of the same command
    # trusts what is there, runs only the other cells and ends with the uninterrupted run's report
    out = tmp_path / "killed"
    cmd = _cli(out, "--backend", "serial")
    status, done = _interrupt_after_first_cell(cmd, out, signal.SIGKILL, tmp_path / "first.log")
    assert status == -signal.SIGKILL and 1 <= len(done) < 4, (status, sorted(done))
    _assert_nothing_half_written(out, orphans_allowed=True)
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    log = _last_log(out)
    assert (log["backend"], log["skipped"], log["done"], log["failed"]) == ("serial", len(done), 4 - len(done), 0)
    assert not set(log["cell_s"]) & {Path(name).stem for name in done}  # the finished cells did not run again
    assert all((out / "cells" / name).read_bytes() == data for name, data in done.items())
    assert rerun.stdout == serial[3] + "\n" and sweep_report(out) == serial[3]


def test_readme_sweep_and_benchmark_commands_are_the_same_grid(monkeypatch):
    # README "Large sweeps": `isvit-viz sweep ...` and its `python -m benchmarks.accuracy ... --sweep` twin
    from benchmarks import accuracy

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("\n## Large sweeps\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = "\n".join(line.removeprefix("#").strip() for line in block.splitlines()).replace("\\\n", " ").splitlines()
    cli = shlex.split(next(line for line in lines if line.startswith("isvit-viz sweep --")))[2:]
    bench = shlex.split(next(line for line in lines if line.startswith("python -m benchmarks.accuracy ")))[3:]
    got = []
    monkeypatch.setattr("isvit_viz.sweep.command.run_and_report", lambda spec, out, **kw: got.append((spec, str(out))) or 0)
    assert main(["sweep", *cli]) == 0
    accuracy.main(bench)
    (cli_spec, cli_out), (bench_spec, bench_out) = got
    assert cli_out == bench_out and cli_spec.normalized() == bench_spec.normalized()


# ----------------------------------------------------------------------------- Ray started by the command, or already running
@needs_ray
@pytest.mark.slow
def test_interrupted_ray_sweep_on_its_own_instance_resumes(serial, tmp_path):
    # no address, no $RAY_ADDRESS: the command starts a local Ray instance and shuts it down, also on Ctrl-C
    out = tmp_path / "ctrl-c"
    cmd = _cli(out, "--backend", "ray")
    status, done = _interrupt_after_first_cell(cmd, out, signal.SIGINT, tmp_path / "first.log")
    assert status == 130 and 1 <= len(done) < 4, (status, sorted(done), (tmp_path / "first.log").read_text())
    assert "interrupted" in (tmp_path / "first.log").read_text()
    _assert_nothing_half_written(out, orphans_allowed=False)
    workers = {json.loads(data)["sweep"]["pid"] for data in done.values()}
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers)  # the instance went down with the command
    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    log = _last_log(out)
    assert (log["backend"], log["address"], log["skipped"], log["done"]) == ("ray", None, len(done), 4 - len(done))
    assert log["failed"] == 0 and log["startup_s"] > 0 and log["cluster_cpus"] >= 1
    assert all((out / "cells" / name).read_bytes() == data for name, data in done.items())
    assert sweep_report(out) == serial[3]


@contextlib.contextmanager
def _ray_head(log: Path) -> Iterator[str]:
    """An existing Ray instance in another process (3 logical CPUs): its GCS address. On this node's
    address, as `ray start --head` does: Ray rewrites a loopback address it is given to that one, so
    a head bound to 127.0.0.1 could not be joined. Stopped by closing its stdin (the process shuts Ray
    down as it exits), never by `ray stop`, which would stop every Ray instance of this machine."""
    code = (
        "import sys, warnings, ray; warnings.simplefilter('ignore', FutureWarning); "
        "ray.init(address='local', num_cpus=3, include_dashboard=False, log_to_driver=False); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
    )
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, text=True)  # fmt: skip
    try:
        address = proc.stdout.readline().strip()
        assert address, f"the Ray head did not start: {log.read_text()}"
        yield address
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


@needs_ray
@pytest.mark.slow
def test_command_runs_on_an_existing_ray_instance(serial, tmp_path):
    # through --address, then through $RAY_ADDRESS; the head goes down before the next tests
    with _ray_head(tmp_path / "head.log") as address:
        for how, flags, env in (("flag", ["--address", address], _env()), ("env", [], _env(RAY_ADDRESS=address))):
            out = tmp_path / how
            run = subprocess.run(_cli(out, *flags, methods=["minmax"]), env=env, capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr
            log = _last_log(out)
            # 3 CPUs: the head's, not a local instance of this machine's cores
            assert (log["backend"], log["address"], log["cluster_cpus"], log["done"]) == ("ray", address, 3.0, 2), how
            for cell in (out / "cells").glob("*.json"):
                (rec,), (ref,) = (json.loads(p.read_text())["runs"] for p in (cell, serial[0] / "cells" / cell.name))
                assert [rec[k] for k in NUMBERS] == [ref[k] for k in NUMBERS]


class _LossyRay:
    """A stand-in for ``ray`` whose first cancel of a task is lost (Ray answers a cancel that reaches a
    worker before the task starts "not running" and drops it), as seen on a loaded CI machine."""

    def __init__(self, lost: set[str]):
        self.ended: set[str] = set()
        self.lost = set(lost)
        self.cancels: list[str] = []

    def cancel(self, ref: str, force: bool) -> None:
        assert force  # a KeyboardInterrupt could leave a reused worker half-initialised
        self.cancels.append(ref)
        if ref in self.lost:
            self.lost.discard(ref)
        else:
            self.ended.add(ref)

    def wait(self, refs: list[str], num_returns: int, timeout: float) -> tuple[list[str], list[str]]:
        assert num_returns == len(refs) and timeout > 0
        return [r for r in refs if r in self.ended], [r for r in refs if r not in self.ended]


def test_a_lost_cancel_is_asked_again_until_the_task_ends():
    from isvit_viz.sweep.runner import _cancel

    ray = _LossyRay(lost={"b"})
    assert _cancel(ray, ["a", "b", "c"], poll_s=0.01) == []
    assert ray.cancels == ["a", "b", "c", "b"]  # only the task still running is asked again
    assert ray.ended == {"a", "b", "c"}


def test_a_task_that_never_ends_is_returned_after_the_timeout():
    from isvit_viz.sweep.runner import _cancel

    class Stuck(_LossyRay):
        def cancel(self, ref: str, force: bool) -> None:
            self.cancels.append(ref)

    ray = Stuck(lost=set())
    t0 = time.monotonic()
    assert _cancel(ray, ["a"], poll_s=0.01, timeout_s=0.05) == ["a"]
    assert time.monotonic() - t0 < 5 and len(ray.cancels) >= 2


# ----------------------------------------------------------------------------- Ray (a local 2-CPU cluster, loopback)
@pytest.fixture(scope="module")
def ray_cluster():
    if not HAVE_RAY:
        pytest.skip("ray is not installed (`make test` installs it: the [sweep] extra)")
    import ray

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about accelerator env vars
        # address "local": a new instance, never another test's head
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=100 * 2**20, log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


@needs_ray
def test_ray_grid_completes_with_the_serial_report(ray_cluster, serial, tmp_path):
    summary = run_sweep(SweepSpec(**TINY), tmp_path / "ray", progress=False)
    assert (summary.backend, summary.done, summary.failed, summary.cluster_cpus) == ("ray", 4, 0, 2.0)
    assert sweep_report(tmp_path / "ray") == serial[3]
    pids = {json.loads(p.read_text())["sweep"]["pid"] for p in (tmp_path / "ray" / "cells").glob("*.json")}
    assert os.getpid() not in pids  # the cells ran in Ray workers, not here


@needs_ray
def test_a_cells_threads_are_the_cpus_it_asks_ray_for(ray_cluster, tmp_path):
    def probe(spec, cell):  # what Ray gave the task, seen from inside it
        import ray

        payload = run_cell(spec, cell)
        payload["sweep"]["resources"] = ray.get_runtime_context().get_assigned_resources()
        return payload

    out = tmp_path / "threads"
    spec = SweepSpec(**(TINY | {"methods": ["minmax"], "bits": [4], "threads": 2}))
    summary = run_sweep(spec, out, progress=False, cell_fn=probe)
    assert (summary.done, summary.failed) == (1, 0), _failures(out)
    payload = json.loads((out / "cells" / "vit_minmax_w4a4_s0.json").read_text())
    assert payload["sweep"]["resources"] == {"CPU": 2.0} and payload["env"]["threads"] == 2
    with pytest.raises(ValueError, match="threads 3 per cell: the Ray cluster has only 2 CPUs"):
        run_sweep(SweepSpec(**(TINY | {"threads": 3})), tmp_path / "t3", progress=False)


@needs_ray
def test_ray_sweep_stopped_after_one_cell_resumes_with_the_rest(ray_cluster, serial, tmp_path):
    out, hold, started = tmp_path / "resume", tmp_path / "hold", tmp_path / "started"
    hold.touch()
    started.mkdir()

    def held(spec, cell):  # while `hold` exists, the other cells wait: one is running when the sweep stops
        if hold.exists() and cell.key != "vit_minmax_w3a3_s0":
            (started / str(os.getpid())).touch()
            time.sleep(300)
        elif hold.exists():  # the cell that finishes waits for a held one to start (a loaded machine starts it late)
            deadline = time.monotonic() + 120
            while not any(started.iterdir()) and time.monotonic() < deadline:
                time.sleep(0.1)
        return run_cell(spec, cell)

    first = run_sweep(SweepSpec(**TINY), out, max_cells=1, progress=False, cell_fn=held)  # stop after one cell
    assert (first.done, first.not_run) == (1, 3), _failures(out)
    # a cell cancelled while running takes its worker with it (an interrupt could leave it half-initialised)
    running = [int(p.name) for p in started.iterdir()]
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in running) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running and not any(_alive(pid) for pid in running)
    hold.unlink()
    (done,) = (out / "cells").glob("*.json")
    before = done.read_bytes()
    second = run_sweep(SweepSpec(**TINY), out, progress=False, cell_fn=held)
    assert (second.skipped, second.done, second.failed) == (1, 3, 0), _failures(out)
    assert done.stem not in second.cell_s and done.read_bytes() == before  # the finished cell was not rerun
    assert sweep_report(out) == serial[3]


@needs_ray
def test_a_failing_cell_is_recorded_and_the_others_finish(ray_cluster, serial, tmp_path, capsys):
    out = tmp_path / "fail"

    def flaky(spec, cell):  # a local function: shipped to the Ray workers by value
        if cell.key == "vit_repq-vit_w3a3_s0":
            raise RuntimeError("boom in the cell")
        return run_cell(spec, cell)

    summary = run_sweep(SweepSpec(**TINY), out, progress=False, cell_fn=flaky)
    assert (summary.done, summary.failed) == (3, 1), _failures(out)
    rec = json.loads((out / "failed" / "vit_repq-vit_w3a3_s0.json").read_text())
    assert rec["error"] == "RuntimeError: boom in the cell" and 'raise RuntimeError("boom in the cell")' in rec["traceback"]
    assert main(["sweep", "report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 cells finished, 1 failed" in err and "failed vit_repq-vit_w3a3_s0: RuntimeError: boom in the cell" in err
    again = run_sweep(SweepSpec(**TINY), out, progress=False)  # a rerun retries only the failed cell
    assert (again.skipped, again.done, again.failed) == (3, 1, 0)
    assert not list((out / "failed").glob("*.json")) and sweep_report(out) == serial[3]


def test_benchmarks_accuracy_sweep_mode_runs_the_same_cell(serial, tmp_path, capsys):
    from benchmarks import accuracy

    out = tmp_path / "acc"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)  # serial: the flags' mapping onto the spec is what is tested here
        accuracy.main(["--models", "vit", "--methods", "minmax", "--bits", "4", "--seeds", "0", "--calib", "16",
                       "--iters", "1", "--test", "64", "--sweep", str(out)])  # fmt: skip
    assert capsys.readouterr().out == sweep_report(out) + "\n"
    (cell,) = (out / "cells").glob("*.json")
    reference = serial[0] / "cells" / cell.name
    assert json.loads(cell.read_text())["runs"][0]["q_top1"] == json.loads(reference.read_text())["runs"][0]["q_top1"]
    assert json.loads(cell.read_text())["settings"] == json.loads(reference.read_text())["settings"]


def test_benchmarks_accuracy_sweep_mode_exit_status(tmp_path, capsys, monkeypatch):
    # as `isvit-viz sweep`: bad input is one line and exit 2 before any cell, a failed cell exit 1
    from benchmarks import accuracy

    argv = ["--models", "vit", "--methods", "minmax", "--bits", "4", "--seeds", "0", "--calib", "16", "--iters", "1",
            "--test", "64"]  # fmt: skip
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SystemExit) as bad:
        accuracy.main([*argv, "--methods", "isvitt", "--sweep", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert bad.value.code == 2 and len(err) == 1 and err[0].startswith("benchmarks.accuracy: error: unknown method 'isvitt'")
    assert not (tmp_path / "bad").exists()

    def broken(spec, cell):
        raise RuntimeError("boom in the cell")

    monkeypatch.setattr("isvit_viz.sweep.cell.run_cell", broken)
    with pytest.raises(SystemExit) as failed:
        accuracy.main([*argv, "--sweep", str(tmp_path / "failed")])
    assert failed.value.code == 1
    assert "failed vit_minmax_w4a4_s0: RuntimeError: boom in the cell" in capsys.readouterr().err


def test_imagenet_cell_on_a_synthetic_image_folder(tmp_path):
    # the timm path: calibration drawn from data/train, a stratified subset of data/val, 1000 class folders
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(1000):
            (tmp_path / "in" / split / f"n{c:05d}").mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                tmp_path / "in" / split / f"n{c:05d}" / "0.JPEG"
            )
    spec = SweepSpec(models=["deit_tiny_patch16_224"], methods=["minmax"], bits=[4], seeds=[0], calib=4, test=8,
                     data=str(tmp_path / "in"), weights={"deit_tiny_patch16_224": "random"})  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "ray", None)
        summary = run_sweep(spec, tmp_path / "s", progress=False, log=lambda s: None)
    assert (summary.done, summary.failed) == (1, 0), [p.read_text() for p in (tmp_path / "s" / "failed").glob("*.json")]
    run = json.loads((tmp_path / "s" / "cells" / "deit_tiny_patch16_224_minmax_w4a4_s0.json").read_text())["runs"][0]
    assert (run["model"], run["calib_images"], run["n"]) == ("deit_tiny_patch16_224", 4, 8)
    with pytest.raises(ValueError, match="needs weights"):
        run_sweep(SweepSpec(models=["deit_tiny_patch16_224"], data=str(tmp_path / "in")), tmp_path / "t", backend="serial")
    with pytest.raises(FileNotFoundError, match="missing folder"):
        run_sweep(SweepSpec(**(spec.to_dict() | {"data": str(tmp_path)})), tmp_path / "t", backend="serial")
