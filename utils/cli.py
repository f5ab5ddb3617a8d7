"""What every numbered stage script shares: its arguments and its error handling.

    python 0N_stage.py --config configs/smoke.yaml --set vision.epochs=2 controller.popsize=8

A `UserError` (bad input) is printed as one line `error: ...` on stderr and
the script exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from utils.config import Config, load_config
from utils.errors import UserError

STAGE_DIRS = {
    "rollouts": "rollouts",
    "vision": "vision",
    "latents": "latents",
    "mdnrnn": "mdnrnn",
    "controller": "controller",
    "eval": "eval",
}


def stage_parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The arguments every stage takes: --config FILE and --set section.key=value ..."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=config_required, help="experiment YAML file (see configs/)")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
        help="override config keys; may be repeated (--set a.b=1 --set c.d=2)",
    )
    return parser


def load_stage_config(args: argparse.Namespace) -> Config:
    """The validated config of --config with --set applied (UserError on any bad key)."""
    return load_config(args.config, args.set)


def stage_dir(cfg: Config, name: str) -> str:
    """<run_dir>/<stage folder> for a stage name of STAGE_DIRS."""
    return os.path.join(cfg.run_dir, STAGE_DIRS[name])


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
