"""One hub download in a process of its own: what the loop runs (engine/download_process.py `download_async`).

    python -m opta_lmx.engine.download_main OWNER/NAME [--endpoint URL] [--cache-dir DIR] ...

It runs `download` (huggingface_hub's snapshot download, guarded) and writes JSON lines on
stdout: `{"progress": {...}}` as it goes, then `{"path": DIR}` or `{"error": MESSAGE, "kind":
"permanent"|"temporary"}`. A process, so that cancelling a download (a model left models.yaml,
the server stops) is killing it, at once, whatever the hub does, and no thread of the control
plane is ever held by a slow hub. Its token comes from the environment (HF_TOKEN), never argv.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from opta_lmx.engine.download import DownloadCancelled, DownloadError, PermanentDownloadError, download

STALE_PARTIAL_S = 600.0  # a partial file nobody has written to for this long belongs to a killed download


def sweep_stale_partials(source: str, cache_dir: str | None) -> None:
    """Remove partial files of this repo that a killed download left (huggingface_hub names them per
    process and never resumes or removes another's); a live download writes to its own constantly."""
    from huggingface_hub import constants

    owner_name = source.strip("/").replace("/", "--")
    blobs = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{owner_name}" / "blobs"
    now = time.time()
    for partial in blobs.glob("*.incomplete"):
        try:
            if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                partial.unlink()
        except OSError:
            continue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opta_lmx.engine.download_main")
    parser.add_argument("source")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--endpoint", default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--no-token", action="store_true", help="send no token (the fake hub in tests)")
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--chunk-bytes", type=int, default=1024**2,
                        help="bytes read at a time: how often the declared size is checked")
    args = parser.parse_args(argv)
    from huggingface_hub import constants

    constants.DOWNLOAD_CHUNK_SIZE = max(16 * 1024, args.chunk_bytes)  # read at each call, not captured
    lock = threading.Lock()
    cancel = threading.Event()  # SIGTERM: stop at the next chunk, so huggingface_hub removes its partial file
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())
    sweep_stale_partials(args.source, args.cache_dir)

    def say(message: dict) -> None:
        with lock:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

    try:
        path = download(args.source, lambda progress: say({"progress": asdict(progress)}), revision=args.revision,
                        endpoint=args.endpoint, cache_dir=args.cache_dir,
                        token=False if args.no_token else None, interval=args.interval, cancel=cancel)
    except DownloadCancelled as error:
        say({"error": error.message, "kind": "cancelled"})
        return 1
    except DownloadError as error:
        say({"error": error.message, "kind": "permanent" if error.permanent else "temporary"})
        return 1
    except Exception as error:  # noqa: BLE001 - anything else: said in one line, retried with backoff
        kind = "permanent" if isinstance(error, PermanentDownloadError) else "temporary"
        say({"error": f"{type(error).__name__}: {error}", "kind": kind})
        return 1
    say({"path": str(path)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
