"""What every numbered stage script shares: its arguments, its error handling, its output folder.

    python 0N_stage.py --config configs/carracing_vae.yaml configs/blocks/dream.yaml --set controller.popsize=8
    python 0N_stage.py --help-config       # every config key: type, default, allowed values, meaning

A `UserError` (bad input) is printed as one line `error: ...` on stderr and
the script exits with status 2; Ctrl-C exits with 130.

`open_stage_dir` is how a stage claims its folder, after its inputs are
checked: it checks that run_dir is writable, creates the folder and holds an
exclusive lock on `<folder>/.lock` for the life of the process, so a second
process on the same stage folder stops at once with one line.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
from typing import Callable

from utils.config import Config, config_help, load_config
from utils.errors import UserError

STAGE_DIRS = {
    "rollouts": "rollouts",
    "vision": "vision",
    "latents": "latents",
    "mdnrnn": "mdnrnn",
    "controller": "controller",
    "eval": "eval",
}

_LOCKS: list = []  # open lock files: kept referenced so the locks live as long as the process


class _HelpConfig(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(config_help())
        parser.exit()


def stage_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The arguments every stage takes: --config FILE [FILE ...], --set section.key=value ..., --help-config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", nargs="+", required=config_required, metavar="FILE",
                        help="experiment YAML file(s), merged left to right (see configs/ and configs/blocks/)")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
        help="override config keys; may be repeated (--set a.b=1 --set c.d=2)",
    )
    parser.add_argument("--help-config", action=_HelpConfig,
                        help="list every config key with its type, default, allowed values and meaning, and exit")
    return parser


def load_stage_config(args: argparse.Namespace) -> Config:
    """The validated config of --config with --set applied (UserError on any bad key)."""
    return load_config(args.config, args.set)


def stage_dir(cfg: Config, name: str) -> str:
    """<run_dir>/<stage folder> for a stage name of STAGE_DIRS."""
    return os.path.join(cfg.run_dir, STAGE_DIRS[name])


def check_writable(folder: str) -> None:
    """Raise UserError unless `folder` exists and is writable, or can be created where it would go."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"{folder}: cannot create the folder ({path} is a file)")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{folder}: not writable ({path} denies writing); choose another run_dir")


def open_stage_dir(cfg: Config, name: str) -> str:
    """Create <run_dir>/<name> and lock it for this process; return its path.

    Raises:
        UserError: run_dir is not writable, or another process holds the folder's lock.
    """
    folder = stage_dir(cfg, name)
    check_writable(folder)
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UserError(f"{folder}: in use by {holder}; wait for it to finish or stop it") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    _LOCKS.append(lock)
    return folder


def run_stage(main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call `main(argv)`; turn a UserError into one line on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
