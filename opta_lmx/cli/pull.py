"""`lmx pull SOURCE`: fetch a hub model into the Hugging Face cache ahead of time, with a progress bar.

The download is the control loop's own (engine/download.py, huggingface_hub's resumable
`snapshot_download`), run in a thread so that Ctrl-C can stop it cleanly at the next chunk: the
files already complete stay in the cache and the next `lmx pull` fetches only the rest.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any

EXIT_PERMANENT = 1  # missing, private or gated repo; offline and not cached
EXIT_TEMPORARY = 75  # EX_TEMPFAIL: the hub could not be reached or the line broke; run it again
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT
STOP_WAIT_S = 30.0  # how long Ctrl-C waits for the download threads to close their files


def add_parser(sub) -> None:
    pull = sub.add_parser("pull", help="download a hub model into the Hugging Face cache ahead of time")
    pull.add_argument("source", help="a hub model id, owner/name (as in a models.yaml `source:`)")
    pull.add_argument("--revision", help="a branch, tag or commit (default: main)")
    pull.add_argument("--endpoint", help="the hub's URL (default: $HF_ENDPOINT or https://huggingface.co)")
    pull.add_argument("--cache-dir", help="the hub cache (default: $HF_HUB_CACHE, else $HF_HOME/hub)")
    pull.add_argument("-q", "--quiet", action="store_true", help="no progress bar; print only the path")
    pull.set_defaults(func=cmd_pull)


class ProgressBar:
    """A tqdm byte bar fed with DownloadProgress snapshots (absolute counts, not increments)."""

    def __init__(self, quiet: bool):
        self._quiet = quiet
        self._bar: Any = None  # a tqdm once the total is known

    def __call__(self, progress) -> None:
        if self._quiet:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=progress.total_bytes, initial=progress.done_bytes, unit="B", unit_scale=True,
                             unit_divisor=1024, desc=progress.repo_id, file=sys.stderr, dynamic_ncols=True)
        self._bar.update(progress.done_bytes - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def cmd_pull(args: argparse.Namespace) -> int:
    from opta_lmx.engine import download as dl

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2", "httpcore"):  # one INFO line per request would drown the bar
            logging.getLogger(name).setLevel(logging.WARNING)
    if dl.hub_repo_id(args.source) is None:
        print(f"lmx pull: {args.source!r} is not a hub model id (owner/name); local paths need no pull",
              file=sys.stderr)
        return EXIT_PERMANENT
    if dl.offline():
        cached = dl.cached_snapshot(args.source, cache_dir=args.cache_dir)
        if cached is not None:
            print(cached)
            return 0
    bar = ProgressBar(args.quiet)
    cancel = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["path"] = dl.download(args.source, bar, revision=args.revision, endpoint=args.endpoint,
                                          cache_dir=args.cache_dir, cancel=cancel, interval=0.2)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread, which reports it
            outcome["error"] = error

    thread = threading.Thread(target=run, name="lmx-pull", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        return _interrupted(args.source, thread, cancel, bar)
    bar.close()
    error = outcome.get("error")
    if isinstance(error, dl.PermanentDownloadError):
        print(f"lmx pull: {error.message}", file=sys.stderr)
        return EXIT_PERMANENT
    if isinstance(error, dl.DownloadError):
        print(f"lmx pull: {error.message.removesuffix('; will retry')}; run `lmx pull {args.source}` again: "
              "the files already fetched are kept", file=sys.stderr)
        return EXIT_TEMPORARY
    if error is not None:  # whatever else a hub can make go wrong: one line, never a traceback
        print(f"lmx pull: {args.source}: {type(error).__name__}: {' '.join(str(error).split())[:300]}; run "
              f"`lmx pull {args.source}` again (the files already fetched are kept)", file=sys.stderr)
        return EXIT_TEMPORARY
    print(outcome["path"])
    return 0


def _interrupted(source: str, thread: threading.Thread, cancel: threading.Event, bar: ProgressBar) -> int:
    """Stop at the next chunk so no partial file is left behind; a second Ctrl-C quits at once."""
    cancel.set()
    bar.close()
    print(f"\nlmx pull: interrupted; stopping the download (Ctrl-C again to quit at once). "
          f"`lmx pull {source}` resumes: the files already fetched are kept", file=sys.stderr, flush=True)
    try:
        thread.join(STOP_WAIT_S)
    except KeyboardInterrupt:
        pass
    sys.stderr.flush()
    if thread.is_alive():
        os._exit(EXIT_INTERRUPTED)  # huggingface_hub's pool threads would otherwise hold the exit
    return EXIT_INTERRUPTED
