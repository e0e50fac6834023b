"""The folder `lorafit ui` works in, laid out exactly as the CLI writes it, so the CLI and the
app see the same things:

    glossaries/NAME.yaml     uploaded or edited glossaries
    data/NAME/               `lorafit data generate` output for glossary NAME
    configs/RUN.yaml         the settings a run was started with (the Plan screen)
    runs/RUN/                run directories (`lorafit train`), runs/mlflow.db the tracking store
    exports/                 GGUF files and their Modelfiles
    .lorafit-ui/jobs/        one JSON file and one log per background job (train, eval, export)

Every path a request names is checked to stay inside the workspace (no "..", no absolute
path, no symlink out). Jobs are plain `lorafit` subprocesses, so closing the browser or
restarting the app loses nothing: a page re-attaches to a job from these files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.rundir import RunDir, read_json, write_json

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GLOSSARY_SUFFIXES = (".yaml", ".yml", ".json", ".csv")


def safe_name(name: str, what: str = "name") -> str:
    """A file or folder name the app may create: letters, digits, '.', '_', '-'; never a
    path ('/', '..')."""
    if not NAME.match(name) or ".." in name:
        raise LorafitError(f"{what} {name!r}: use letters, digits, '.', '_' and '-' only")
    return name


@dataclass
class Job:
    """A background `lorafit` command the app started."""

    id: str
    kind: str  # train | eval | merge | export
    run: str
    args: list[str]
    pid: int = 0
    started: float = 0.0
    returncode: int | None = None
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        if self.returncode is not None or not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        try:  # a finished child of this process is a zombie until reaped
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            return True  # not our child (the app restarted): kill(0) said it is there
        if pid == 0:
            return True
        self.returncode = os.waitstatus_to_exitcode(status)
        return False


class Workspace:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        for folder in ("glossaries", "data", "configs", "runs", "exports", ".lorafit-ui/jobs"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)

    # --- paths --------------------------------------------------------------------------
    def inside(self, relative: str) -> Path:
        """``relative`` resolved inside the workspace, or an error (no '..', no way out)."""
        if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise LorafitError(f"{relative!r}: not a path inside the workspace")
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise LorafitError(f"{relative!r}: leads outside the workspace")
        return path

    def glossaries(self) -> list[str]:
        folder = self.root / "glossaries"
        return sorted(p.name for p in folder.iterdir() if p.suffix in GLOSSARY_SUFFIXES)

    def glossary_path(self, name: str) -> Path:
        return self.inside(f"glossaries/{safe_name(name, 'glossary')}")

    def data_dir(self, glossary: str) -> Path:
        return self.inside(f"data/{Path(safe_name(glossary, 'glossary')).stem}")

    def runs(self) -> list[str]:
        folder = self.root / "runs"
        return sorted(
            (p.name for p in folder.iterdir() if RunDir.holds_run(p)),
            key=lambda n: (folder / n / RunDir.INFO).stat().st_mtime,
            reverse=True,
        )

    def run_dir(self, name: str) -> RunDir:
        return RunDir(self.inside(f"runs/{safe_name(name, 'run')}"))

    def tracking_uri(self) -> str:
        return (
            os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'runs' / 'mlflow.db'}"
        )

    # --- jobs ---------------------------------------------------------------------------
    def _job_file(self, job_id: str) -> Path:
        return self.root / ".lorafit-ui" / "jobs" / f"{safe_name(job_id, 'job')}.json"

    def log_file(self, job: Job) -> Path:
        return self._job_file(job.id).with_suffix(".log")

    def jobs(self) -> list[Job]:
        out = []
        for path in sorted((self.root / ".lorafit-ui" / "jobs").glob("*.json")):
            try:
                out.append(Job(**read_json(path)))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(out, key=lambda j: j.started, reverse=True)

    def job(self, job_id: str) -> Job:
        path = self._job_file(job_id)
        if not path.is_file():
            raise LorafitError(f"no job {job_id!r}")
        return Job(**read_json(path))

    def save(self, job: Job) -> None:
        write_json(self._job_file(job.id), asdict(job))

    def running(self, kind: str | None = None) -> list[Job]:
        out = []
        for job in self.jobs():
            if job.returncode is None and not job.alive():
                self.save(job)  # record how it ended
            if job.alive() and (kind is None or job.kind == kind):
                out.append(job)
        return out

    def start(self, kind: str, run: str, args: list[str], extra: dict | None = None) -> Job:
        """``lorafit ARGS`` in the background (cwd: the workspace). One training at a time."""
        if kind == "train" and self.running("train"):
            busy = self.running("train")[0]
            raise LorafitError(
                f"run {busy.run!r} is training; one training runs at a time: wait for it or stop it"
            )
        job = Job(
            id=f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{uuid.uuid4().hex[:6]}",
            kind=kind,
            run=run,
            args=args,
            extra=extra or {},
        )
        log = self.log_file(job).open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "lorafit", *args],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "120"},
            start_new_session=True,  # Ctrl-C in the app's terminal does not reach it
        )
        log.close()
        job.pid, job.started = process.pid, time.time()
        self.save(job)
        return job

    def stop(self, job: Job) -> None:
        """Ask a job to stop: training saves a checkpoint first (SIGINT, like Ctrl-C)."""
        if job.alive():
            os.kill(job.pid, signal.SIGINT)

    def train_status(self, run: str) -> tuple[str, Job | None, str]:
        """The run's status as its Train page shows it, its latest training job, and what went
        wrong when that process ended without saying so in run.json. Before this job wrote
        run.json (a bad setting caught at start; a run.json older than the job is an earlier
        attempt's) that is "failed", never "starting" for good; after, the status stays
        run.json's (the run may have been resumed from a terminal) with a notice."""
        folder = self.run_dir(run)
        job = next((j for j in self.jobs() if j.run == run and j.kind == "train"), None)
        code_unknown = job is not None and job.returncode is None
        alive = bool(job and job.alive())  # before run.json is read: it may finish meanwhile
        if code_unknown and not alive and job.returncode is not None:
            self.save(job)  # its exit code, reaped just now, for every later reader (once)
        status = None
        try:  # no is_file() first: --overwrite may replace the run between any two calls
            written = folder.info_file.stat().st_mtime
            # a run.json older than this job is an earlier attempt's
            if job is None or written >= job.started:
                status = folder.info().get("status")
        except FileNotFoundError:
            pass
        if job is None:
            return status or ("starting" if folder.path.is_dir() else "-"), None, ""
        if alive or status not in (None, "new", "running"):
            return status or "starting", job, ""
        code = "unknown" if job.returncode is None else job.returncode
        if status is None:
            return (
                "failed",
                job,
                f"the training ended before it began (exit code {code}): see its log",
            )
        return (
            status,
            job,
            (
                f"the training this app started has ended (exit code {code}) without marking the run "
                "finished: unless it was resumed from a terminal, it was killed; Resume continues "
                "from its last checkpoint"
            ),
        )

    def tail(self, job: Job, lines: int = 30) -> str:
        path = self.log_file(job)
        if not path.is_file():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def metrics_rows(run: RunDir) -> list[dict]:
    """The run's metrics.jsonl as it stands (a training may be writing it)."""
    if not run.metrics_file.is_file():
        return []
    rows = []
    for line in run.metrics_file.read_text().split("\n"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # the line being written
    return rows
