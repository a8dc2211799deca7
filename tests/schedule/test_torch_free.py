"""ds_plugins.schedule and the interleaf CLI work where torch, deepspeed (and matplotlib) cannot be imported."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The child runs with ``python -S``: site-packages is never put on sys.path, so torch, deepspeed, megatron and
# matplotlib are as absent as on a machine without them (importlib.util.find_spec returns None for them).
BLOCKER = textwrap.dedent(
    """
    import importlib.util, sys

    for name in ("torch", "deepspeed", "megatron", "matplotlib"):
        if importlib.util.find_spec(name) is not None:
            raise SystemExit(f"{name} is still importable: the test environment leaks site-packages")
    """
)

CHILD = BLOCKER + textwrap.dedent(
    """
    import importlib, io, json, pkgutil, contextlib, tempfile, os

    import ds_plugins.schedule as schedule
    modules = [m.name for m in pkgutil.walk_packages(schedule.__path__, "ds_plugins.schedule.")]
    for name in modules:
        importlib.import_module(name)
    import ds_plugins.cli as cli

    from ds_plugins.schedule.registry import build_schedule, SCHEDULE_NAMES
    s = build_schedule("zb-v", pp=4, microbatches=8)
    result = schedule.simulate(s, schedule.CostModel.uniform(s.shape))
    schedule.validate(schedule.add_communication(s))
    text = schedule.ascii_timeline(result)
    csv_text = schedule.io.csv_text(s)
    assert schedule.io.from_csv(io.StringIO(csv_text), name="zb-v") == s

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["compare", "--pp", "4", "--microbatches", "8", "--json"])
    assert code == 0
    rows = {r["schedule"]: r for r in json.loads(out.getvalue())["schedules"]}
    assert set(rows) == set(SCHEDULE_NAMES) and all("makespan" in r for r in rows.values()), rows

    # Without matplotlib, --png fails with one clear line (exit 1) while the other outputs still work.
    tmp = tempfile.mkdtemp()
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cli.main(["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4",
                         "--trace", os.path.join(tmp, "t.json"), "--png", os.path.join(tmp, "t.png")])
    assert code == 1 and "matplotlib" in err.getvalue() and err.getvalue().count("\\n") == 1, err.getvalue()
    assert os.path.exists(os.path.join(tmp, "t.json"))

    import sys
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "deepspeed", "megatron", "matplotlib"))
    assert not leaked, leaked
    print("OK", len(modules), "modules")
    """
)


@pytest.mark.timeout(120)
def test_schedule_package_and_cli_work_without_torch():
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-S", "-c", CHILD], capture_output=True, text=True, env=env, cwd=REPO, timeout=110)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("OK ")
    assert int(proc.stdout.split()[1]) >= 10  # the schedule modules and the generators were all imported
