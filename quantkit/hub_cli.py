"""The ``push`` subcommand of the CLI.

    python -m quantkit push OUTPUT_DIR REPO_ID [--private] [--revision R] [--message M]

Token from HF_TOKEN or the stored ``hf auth login``; endpoint from HF_ENDPOINT. The handler prints one
line for a push (pushed, or nothing to push) and lets a `QuantkitError` propagate: ``cli.main`` prints
it as one line and exits non-zero (``--debug`` keeps the traceback), as for every subcommand.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_push_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``push`` to a CLI's subparsers; the handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "push",
        help="upload a finished output folder to the Hugging Face Hub and verify it",
        description="Upload a finished quantkit output folder to the Hub in one commit, then check that "
        "every file arrived intact. Token: HF_TOKEN or `hf auth login`. Endpoint: HF_ENDPOINT.",
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="output_dir of a finished quantization")
    parser.add_argument("repo_id", metavar="REPO_ID", help="namespace/name on the Hub; created if missing")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    parser.add_argument("--message", default=None, help="commit message")
    parser.set_defaults(func=run_push)
    return parser


def run_push(args: argparse.Namespace) -> int:
    from quantkit.hub import check_complete_output, check_repo_id, push_folder  # huggingface_hub loads here
    from quantkit.run_lock import RunLock

    check_repo_id(args.repo_id)
    check_complete_output(args.output_dir)  # before the lock, which would create a missing folder's parents
    with RunLock(Path(args.output_dir).expanduser(), recipe="(quantkit push)"):  # no run may replace it meanwhile
        result = push_folder(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.message,
        )
    where, commit, n = f"{result.repo_id}@{result.revision}", result.commit_oid[:12], len(result.files)
    if result.changed:
        print(f"pushed {n} files to {where}, commit {commit}, verified: {result.commit_url}")
    else:
        print(f"{where} already holds these {n} files (commit {commit}, verified); nothing pushed")
    return 0
