"""Ctrl-C during a parallel `quickstart` ends with one line and exit code 130, no worker traceback (issue 11,
item 6). The training jobs are replaced by stand-ins that sleep, so the test takes seconds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGINT are POSIX")

_JOBS = '''
import os
import time
from pathlib import Path


def job(job, *, overwrite, progress, threads):
    """A stand-in for one quickstart run: the zero-fill one keeps working, the other ends at once, so one worker
    is busy and one is idle when Ctrl-C arrives."""
    Path(os.environ["MARKER_DIR"], f"{job.model.key}.started").touch()
    if job.model.key == "zero_fill":
        time.sleep(60)
    return [], 0.0
'''

_MAIN = '''
import sys
from types import SimpleNamespace

import fake_jobs

import medmodal.engine.datamodule as datamodule
import medmodal.methods.shaspec.quickstart as quickstart

quickstart._train_and_evaluate = fake_jobs.job
datamodule.resolve_source = lambda data: SimpleNamespace(cache_dir=0)
datamodule.prepare_cache = lambda source, progress=False: None
from medmodal.cli import main

if __name__ == "__main__":
    sys.argv = ["medmodal", "quickstart", "--fast", "--jobs", "2", "--out", sys.argv[1]]
    main()
'''


def test_ctrl_c_during_a_parallel_quickstart(tmp_path: Path) -> None:
    (tmp_path / "fake_jobs.py").write_text(textwrap.dedent(_JOBS))
    (tmp_path / "main.py").write_text(textwrap.dedent(_MAIN))
    markers = tmp_path / "markers"
    markers.mkdir()
    env = {**os.environ, "MARKER_DIR": str(markers), "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), str(tmp_path / "qs")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(markers.iterdir())) < 2:  # both runs started, one of them already finished
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        time.sleep(1.0)
        start = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err, err
    assert "interrupted" in err and "again" in err, err
    assert time.monotonic() - start < 30  # the stand-in sleeps 60 s: the interrupted run did not finish
