"""Local runs at once never put two embedded Prefect servers on one SQLite database (``flows/embedded.py``).

The runs here are real processes: the lock is an advisory lock that the system drops when a process ends, so only
other processes can show who holds what, and a killed one what it leaves behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for a local run: claims the database as `fastimagic run` does, says what it got, and holds it until
# its stdin closes.
HOLD = """
import sys
from pathlib import Path
from flows.embedded import claim
own = claim(Path(sys.argv[1]))
print(own or "shared", flush=True)
sys.stdin.read()
"""


class Run:
    def __init__(self, database: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(database)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.got = self.proc.stdout.readline().strip()

    def end(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)
        self.proc.stdin.close()


def _own(run: Run, shared: Path) -> Path:
    own = Path(run.got)
    assert own.name == "prefect.db" and own.parent.parent == shared.parent / "fastimagic-runs", run.got
    return own


def test_the_first_local_run_holds_the_shared_database_and_each_run_beside_it_gets_one_of_its_own(tmp_path):
    shared = tmp_path / "prefect.db"
    first = Run(shared)
    assert first.got == "shared"
    second, third = Run(shared), Run(shared)
    own2, own3 = _own(second, shared), _own(third, shared)
    assert own2.parent != own3.parent and own2.parent.is_dir() and own3.parent.is_dir()
    second.end()
    assert not own2.parent.exists()  # deleted when its run ends
    assert own3.parent.is_dir()
    first.end()  # the shared database is free again: the next run takes it
    fourth = Run(shared)
    assert fourth.got == "shared"
    for run in (third, fourth):
        run.end()
    assert list((tmp_path / "fastimagic-runs").iterdir()) == []


def test_a_killed_runs_own_database_is_deleted_by_the_next_run_and_a_live_runs_is_kept(tmp_path):
    shared = tmp_path / "prefect.db"
    first, killed, alive = Run(shared), Run(shared), Run(shared)
    left, kept = _own(killed, shared).parent, _own(alive, shared).parent
    killed.kill()  # SIGKILL: no exit handler runs
    assert left.is_dir()
    nxt = Run(shared)
    assert not left.exists()
    assert kept.is_dir()
    _own(nxt, shared)  # the first still holds the shared one
    for run in (first, alive, nxt):
        run.end()


CHOOSE = """
import os
from flows.embedded import choose_database
own = choose_database()
print(own or "shared", os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL", "-"))
"""


def _choose(home: Path, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_") and "DATABASE" not in k}
    full.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(home), **env)
    out = subprocess.run([sys.executable, "-c", CHOOSE], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_run_uses_prefects_default_database_and_leaves_a_database_or_server_you_set_alone(tmp_path):
    home = tmp_path / "home"
    holder = Run(home / "prefect.db")  # a local run in progress on PREFECT_HOME's database
    try:
        own, url = _choose(home).split()
        assert url == f"sqlite+aiosqlite:///{own}" and Path(own).parent.parent == home / "fastimagic-runs"
        assert not Path(own).parent.exists()  # that process has ended
        mine = f"sqlite+aiosqlite:///{tmp_path / 'mine.db'}"
        assert _choose(home, PREFECT_SERVER_DATABASE_CONNECTION_URL=mine) == f"shared {mine}"
        assert _choose(home, PREFECT_API_URL="http://127.0.0.1:4200/api") == "shared -"
    finally:
        holder.end()
    assert _choose(home) == "shared -"  # nobody else holds it now
    assert not (tmp_path / "mine.db.fastimagic-lock").exists()  # a database you set is not touched at all

