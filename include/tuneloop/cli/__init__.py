"""``tuneloop``: one command per loop step, the same functions the Airflow tasks call.

Each module holds its subcommands' handlers next to their parsers: :mod:`.data` (init,
check-task, demo-world, pull, validate), :mod:`.ml` (build-model, train, evaluate),
:mod:`.loop` (config, drift, label, gate, status), :mod:`.serving` (deploy, rollback, reconcile,
adapter check).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from tuneloop import __version__
from tuneloop.cli import data, loop, ml, serving
from tuneloop.cli.common import ML_COMMANDS, CliError, _reexec_in_ml_env

__all__ = ["CliError", "build_parser", "main"]
from tuneloop.config import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

EPILOG = """\
Your own task: tuneloop init --out my-loop.yaml, then tuneloop check-task --config my-loop.yaml --data rows.jsonl.
The loop, step by step on a shipped example (local store, tiny CPU model):
  export TUNELOOP_CONFIG=examples/NAME/tuneloop.yaml   # NAME: a shipped example (demo-world --help)
  tuneloop demo-world --example NAME --days 28  # traffic + labelled data in the store
  tuneloop build-model                          # tiny Llama + BPE tokenizer, cached
  tuneloop label                                # (data.label_source: teacher) a teacher labels the traffic
  tuneloop pull                                 # labelled partitions -> dataset snapshot
  tuneloop train --snapshot latest --version v1 # LoRA adapter (safetensors + provenance)
  tuneloop evaluate --adapter v1                # per-example scores on held-out sets + eval suites
Settings: --config FILE (or TUNELOOP_CONFIG), overridden by TUNELOOP__SECTION__KEY env vars.
"""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="YAML settings file (default: $TUNELOOP_CONFIG, else embedded defaults)")
    common.add_argument("--job", metavar="FILE", help=argparse.SUPPRESS)  # resolved settings from a parent process (runner.py)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress output on stderr")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="tuneloop",
        description="Keep a LoRA-tuned LLM fresh: drift -> data -> train -> gate -> hot-swap into vLLM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tuneloop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (data, ml, loop, serving):
        module.add_parsers(sub, common)
    return parser


def _eval_backend(args: argparse.Namespace) -> str:
    """The backend ``evaluate`` asks for: ``--backend``, else ``eval.backend`` of its settings."""
    if getattr(args, "backend", None):
        return str(args.backend)
    from tuneloop.cli.common import _settings

    return _settings(args).eval.backend


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if not args.quiet else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # httpx logs one INFO line per request (vLLM, S3): noise next to progress
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command in ML_COMMANDS:
            _reexec_in_ml_env(argv, args.command, backend=_eval_backend(args) if args.command == "evaluate" else None)
        return int(args.func(args))
    except (ConfigError, CliError) as err:
        print(f"tuneloop {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from tuneloop.storage import StorageError

        if args.verbose:
            raise
        if isinstance(err, StorageError):
            print(f"tuneloop {args.command}: storage error: {err}", file=sys.stderr)
            return 3
        if isinstance(err, (ValueError, RuntimeError, OSError)):
            # Our modules raise these with messages meant for users (bad input, a failed
            # step, a server that is down); -v shows the traceback.
            print(f"tuneloop {args.command}: error: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print(f"tuneloop {args.command}: interrupted", file=sys.stderr)
        return 130

