"""Start-up failures are reported once, in one line (issue #22): the root cause unwrapped from Ray's errors (whose
text repeats the remote traceback), exit 2 for our own input errors (config, data, checkpoint), 1 otherwise."""

import traceback

from ray.exceptions import ActorDiedError, RayTaskError

from pipeline.flow.data import DataError
from pipeline.runtime.checkpoint import CheckpointError
from pipeline.tools.cli import _report


def _remote(exc: Exception) -> RayTaskError:
    try:
        raise exc
    except Exception:
        tb = traceback.format_exc()
    return RayTaskError("RolloutActor.__init__", tb, exc)


def test_a_data_error_inside_an_actor_is_one_line(capsys):
    e = ActorDiedError(cause=_remote(DataError("/d/bad.jsonl: line 2: invalid JSON (Expecting value)")))
    assert len(str(e).splitlines()) > 3  # what used to be printed: the remote traceback
    assert _report(e, "run failed before the first step") == 2
    assert capsys.readouterr().err == "dapo: data error: /d/bad.jsonl: line 2: invalid JSON (Expecting value)\n"


def test_a_task_error_is_unwrapped_to_its_cause(capsys):
    assert _report(_remote(CheckpointError("/r/step_2/state.json: unreadable")).as_instanceof_cause(), "x") == 2
    assert capsys.readouterr().err == "dapo: checkpoint error: /r/step_2/state.json: unreadable\n"


def test_any_other_failure_is_one_line_with_its_type(capsys):
    assert _report(_remote(OSError("no space left on device")), "run failed before the first step") == 1
    err = capsys.readouterr().err
    assert (
        err
        == "dapo: run failed before the first step: OSError: no space left on device (traceback: logging.level=DEBUG)\n"
    )


def test_a_run_failure_wrapping_a_remote_traceback_is_one_line():
    from pipeline.runtime.train import RunFailed
    from pipeline.tools.cli import _compact

    cause = _remote(RuntimeError("trainer rank 0: CUDA out of memory"))
    try:
        raise RunFailed(
            f"run failed during step 3: {type(cause).__name__}: {cause}; the last checkpoint is /r/s"
        ) from cause
    except RunFailed as e:
        text = _compact(e)
    assert text == (
        "run failed during step 3: RuntimeError: trainer rank 0: CUDA out of memory; the last checkpoint is /r/s"
    )
