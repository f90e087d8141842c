"""Helpers of the reliability tests (issue 6): recipes written as TOML files, ``kdkit`` run in a subprocess, and a
driver that stops a run at a named point.

Run as a script, this file is the ``kdkit`` command with one test patch applied first, chosen by the environment
variable ``KDKIT_TEST_STOP``. The patches stop the process at a known place instead of racing a timer, so the
interruption tests do not depend on how fast the machine is:

* ``teacher-step:N:S``: SIGKILL at the end of optimizer step ``S`` of the ``N``-th teacher trained;
* ``student-step:S`` / ``student-sigint:S``: SIGKILL / SIGINT (what Ctrl-C sends) at the end of student step ``S``;
* ``student-trained``: SIGKILL as soon as the first student's training returns (its last checkpoint written, the
  run not yet recorded as finished);
* ``student-save:S``: SIGKILL while the Trainer saves ``checkpoint-S`` (weights and optimizer written, its RNG
  state and ``trainer_state.json`` not yet);
* ``logit-write:N``: during the ``N``-th teacher-logit file write, cut its temporary file to half its bytes,
  then SIGKILL (the state a kill in the middle of the write leaves on disk);
* ``hold-teacher-lock:DIR``: before training the first teacher (holding its cache lock), create ``DIR/holding``
  and wait until ``DIR/waiting`` exists;
* ``probe-teacher-lock:DIR``: before taking a teacher's cache lock, try it without blocking; if another process
  holds it, create ``DIR/waiting`` (then wait for the lock as usual).

Nothing in kdkit itself knows about these hooks: the script patches kdkit's functions, then calls
``kdkit.cli.main`` exactly as ``python -m kdkit`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DRIVER = Path(__file__).resolve()


# --------------------------------------------------------------------------- recipes as files
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def toml_text(data: Mapping[str, Any], prefix: str = "") -> str:
    """TOML for a recipe mapping: scalars and arrays first, then one ``[table]`` per nested mapping."""
    lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for key, value in data.items():
        if isinstance(value, Mapping):
            name = f"{prefix}{json.dumps(str(key))}"
            lines.append(f"\n[{name}]")
            lines.append(toml_text(value, prefix=f"{name}."))
    return "\n".join(lines) + "\n"


def write_recipe(path: Path, data: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(data), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- running kdkit
def kdkit_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", NO_COLOR="1")
    # one thread, as in the test process (see one_thread): tiny models gain nothing from more, and the same
    # thread count in every process keeps their float results bit for bit comparable
    env["OMP_NUM_THREADS"] = "1"
    env.pop("KDKIT_TEST_STOP", None)
    env.update(extra or {})
    return env


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread in this process for the block (use it as a module-scoped autouse fixture)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kdkit_command(args: Sequence[str], stop: str | None = None) -> list[str]:
    """``python -m kdkit ARGS``, or the stopping driver when ``stop`` names a point."""
    if stop is None:
        return [PYTHON, "-m", "kdkit", *args]
    return [PYTHON, str(DRIVER), *args]


def run_kdkit(
    args: Sequence[str], *, cwd: Path, stop: str | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    env = kdkit_env({"KDKIT_TEST_STOP": stop} if stop else None)
    return subprocess.run(
        kdkit_command(args, stop), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def start_kdkit(args: Sequence[str], *, cwd: Path, stop: str | None = None) -> subprocess.Popen[str]:
    env = kdkit_env({"KDKIT_TEST_STOP": stop} if stop else None)
    return subprocess.Popen(
        kdkit_command(args, stop), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(path: Path, process: subprocess.Popen[str] | None = None, timeout: float = 300) -> None:
    """Wait until ``path`` exists (fails if ``process`` ends first or the time runs out)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the process ended (rc {process.returncode}) before {path} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


# --------------------------------------------------------------------------- the stopping driver
def _die(sig: int = signal.SIGKILL) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), sig)
    time.sleep(5)  # SIGINT is delivered at the next bytecode; SIGKILL never returns


def _patch_trainers(kind: str, number: int, step: int, sig: int) -> None:
    import kdkit.training.loop
    from transformers import TrainerCallback

    real = kdkit.training.loop.make_trainer
    made = {"teacher": 0, "student": 0}

    class Stop(TrainerCallback):
        def __init__(self, index: int) -> None:
            self.index = index

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.index == number and state.global_step == step:
                _die(sig)

    def make_trainer(*args: Any, **kwargs: Any) -> Any:
        trainer = real(*args, **kwargs)
        # teachers train inside <cache>/teachers/.tmp-<key>-.../.trainer; students in <run>/students/<dir>
        this = "teacher" if "/teachers/" in Path(trainer.args.output_dir).as_posix() else "student"
        made[this] += 1
        if this == kind:
            trainer.add_callback(Stop(made[this]))
        return trainer

    kdkit.training.loop.make_trainer = make_trainer


def _patch_student_trained() -> None:
    import kdkit.stages.students

    real = kdkit.stages.students.fit

    def fit(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        _die()

    kdkit.stages.students.fit = fit


def _patch_checkpoint_save(step: int) -> None:
    from kdkit.training import KDTrainer

    real = KDTrainer._save_rng_state

    def save_rng_state(self: Any, output_dir: Any) -> None:
        if self.state.global_step == step:
            _die()
        real(self, output_dir)

    KDTrainer._save_rng_state = save_rng_state


def _patch_logit_write(number: int) -> None:
    real_fsync = os.fsync
    seen = 0

    def fsync(fd: int) -> None:
        nonlocal seen
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "/logits/.tmp-" in target:
            seen += 1
            if seen == number:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                real_fsync(fd)
                _die()
        real_fsync(fd)

    os.fsync = fsync


def _patch_hold_lock(directory: Path) -> None:
    import kdkit.stages.teachers

    real = kdkit.stages.teachers.train_teacher
    held = False

    def train_teacher(*args: Any, **kwargs: Any) -> Any:
        nonlocal held
        if not held:
            held = True
            (directory / "holding").touch()
            wait_for(directory / "waiting", timeout=300)
        return real(*args, **kwargs)

    kdkit.stages.teachers.train_teacher = train_teacher


def lock_is_held(path: Path) -> bool:
    """Whether another process holds the ``kdkit.store.locks.file_lock`` on ``path`` (tried without waiting)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return False


def _patch_probe_lock(directory: Path) -> None:
    import kdkit.stages.teachers

    real = kdkit.stages.teachers.file_lock

    def file_lock(path: Any, *args: Any, **kwargs: Any) -> Any:
        if lock_is_held(Path(path)):
            (directory / "waiting").touch()
        return real(path, *args, **kwargs)

    kdkit.stages.teachers.file_lock = file_lock


def _install(stop: str) -> None:
    kind, _, rest = stop.partition(":")
    if kind == "teacher-step":
        number, step = (int(v) for v in rest.split(":"))
        _patch_trainers("teacher", number, step, signal.SIGKILL)
    elif kind in ("student-step", "student-sigint"):
        if kind == "student-sigint":
            # as in a terminal: a shell that starts the tests in the background (`make test &`) hands its children
            # SIGINT ignored, and Python then never turns it into KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _patch_trainers("student", 1, int(rest), signal.SIGKILL if kind == "student-step" else signal.SIGINT)
    elif kind == "student-save":
        _patch_checkpoint_save(int(rest))
    elif kind == "student-trained":
        _patch_student_trained()
    elif kind == "logit-write":
        _patch_logit_write(int(rest))
    elif kind == "hold-teacher-lock":
        _patch_hold_lock(Path(rest))
    elif kind == "probe-teacher-lock":
        _patch_probe_lock(Path(rest))
    else:
        raise SystemExit(f"unknown KDKIT_TEST_STOP {stop!r}")


if __name__ == "__main__":
    _install(os.environ["KDKIT_TEST_STOP"])
    from kdkit.cli import main

    main(sys.argv[1:])
