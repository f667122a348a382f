"""Run one TTHA experiment (or a sweep of them with -m): `python train.py [overrides]`.

Bad input stops it before any work with one line, `error: <key>=<value>: <problem>`; Ctrl-C and SIGTERM with
`interrupted (<signal>): run <id> marked KILLED`. HYDRA_FULL_ERROR=1 shows the tracebacks instead.
"""
import os
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ttha.config import ConfigError


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig):
    from ttha import experiment  # heavy imports (torch, mlflow) after Hydra has parsed the command line

    try:
        values = experiment.run(cfg)
    except ConfigError as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper records the trial as failed
        remove_unused_run_dir()
        fail(f"error: {err}", 2)
    return values[0] if len(values) == 1 else values


def remove_unused_run_dir() -> None:
    """A run refused before any work leaves no folder behind: its output dir, when it holds only Hydra's own
    files (the saved configs and the job's log) and lies inside the launch directory or the outputs root;
    then the folders up to that one which it leaves empty (rmdir keeps any another run has written into)."""
    from ttha.paths import outputs_root

    hydra_cfg = HydraConfig.get()
    out = Path(hydra_cfg.runtime.output_dir).absolute()
    base = next((b for b in (Path(hydra_cfg.runtime.cwd).absolute(), outputs_root().absolute())
                 if b in out.parents), None)
    hydra_own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if base is None or not out.is_dir() or any(p.name not in hydra_own for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    for parent in out.parents:
        if parent == base:
            break
        try:
            parent.rmdir()
        except OSError:  # not empty
            break


def fail(line: str, code: int) -> None:
    sys.stdout.flush()
    print(line, file=sys.stderr)
    sys.exit(code)


def error_line(err: Exception) -> str | None:
    """The one line that tells a user what was wrong with their input; None for a bug (keeps its traceback)."""
    if isinstance(err, ConfigError):
        return f"error: {err}"
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"error: {group}={name}: no such option; available: {', '.join(err.options)}"
    if isinstance(err, (HydraException, OmegaConfBaseException)):
        # Hydra's messages: a sentence or two, then indented details and a search path
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln[0].isspace()]
        lines = [ln for ln in lines if not ln.startswith(("Config search path", "See https://"))]
        prefix = f"{err.override}: " if isinstance(err, OverrideParseException) else ""
        return f"error: {prefix}{' '.join(lines)}"
    if isinstance(err, OSError) and err.filename:
        return run_folder_line(err) or f"error: {err.filename}: {err.strerror}"
    return None


def run_folder_line(err: OSError) -> str | None:
    """When Hydra could not create the run's folder under the outputs root (outputs/ is a file or read-only,
    paths.outputs where nothing can be created): the line naming paths.outputs (set by ttha.paths.UseOutputs
    before Hydra makes the folder)."""
    from ttha.paths import outputs_root, outputs_setting

    root, failed = outputs_root().absolute(), Path(str(err.filename)).absolute()
    if failed != root and root not in failed.parents:
        return None
    return (f"error: paths.outputs={outputs_setting()!r}: cannot create the run folder "
            f"({err.strerror}: {err.filename})")


def cli() -> None:
    show_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises its errors instead of printing them: one line below
    try:
        main()
    except KeyboardInterrupt as err:  # the MLflow run is already marked KILLED; the stack says nothing new
        signum = getattr(err, "signum", signal.SIGINT)
        run_id = getattr(err, "run_id", None)
        fail(f"interrupted ({signal.Signals(signum).name})" + (f": run {run_id} marked KILLED" if run_id else ""),
             128 + signum)
    except Exception as err:
        line = error_line(err)
        if show_tracebacks or line is None:
            raise
        fail(line, 1 if isinstance(err, OSError) and not isinstance(err, HydraException) else 2)


if __name__ == "__main__":
    cli()
