"""Why a worker ended is said by the worker (issue 20): the launcher classifies what raised while
loading and announces `failed permanent|temporary <reason>` before exiting 10 or 11. A crash
whose traceback says "Error:" (every Python traceback nearly does) backs off; only a reason known
to be permanent (files missing, a model vllm-mlx cannot serve, arguments it refuses) is Failed."""

from __future__ import annotations

import asyncio
import sys

import pytest

from opta_lmx.engine.worker import Worker, WorkerSpec, WorkerStartError
from opta_lmx.engine.worker_main import PERMANENT_EXIT, TEMPORARY_EXIT, classify, failure_word, parse_failure

# Runs the real launcher (engine/worker_main.py) over a stand-in vllm-mlx whose load raises `ERROR`.
STAND_IN = """
import sys, types
error, where = sys.argv[1], sys.argv[2]
server = types.ModuleType("vllm_mlx.server")
def load_model(*a, **k):
    raise eval(error)
server.load_model = load_model
cli = types.ModuleType("vllm_mlx.cli")
def main():
    print("Loading model...", flush=True)
    if where == "arguments":
        print("Error: --max-num-seqs must be positive", flush=True)
        sys.exit(1)
    sys.modules["vllm_mlx.server"].load_model("m")
cli.main = main
package = types.ModuleType("vllm_mlx")
package.cli, package.server = cli, server
sys.modules.update({"vllm_mlx": package, "vllm_mlx.cli": cli, "vllm_mlx.server": server})
from opta_lmx.engine import worker_main
sys.exit(worker_main.main(sys.argv[3:]))
"""


class StandInWorker(Worker):
    error = "RuntimeError('x')"
    where = "load"

    def command(self, announce_fd: int, listen_fd: int) -> list[str]:
        # It names the launcher (so it announces), and runs it over the stand-in vllm-mlx.
        return [sys.executable, "-c", STAND_IN, self.error, self.where, "--announce-fd", str(announce_fd),
                "--listen-fd", str(listen_fd), "--", "serve", "m", "opta_lmx.engine.worker_main"]


@pytest.mark.parametrize(("error", "where", "permanent"), [
    # out of memory while loading, in the words MLX uses on Metal: a traceback with "Error:" in it
    ("RuntimeError('[metal::malloc] Error: attempting to allocate 80 GB')", "load", False),
    ("MemoryError()", "load", False),
    ("OSError(5, 'Input/output error')", "load", False),
    # known permanent: the model's files, a model type mlx-lm does not know, arguments refused
    ("FileNotFoundError(2, 'No such file or directory', 'config.json')", "load", True),
    ("ValueError('Model type no_such_architecture not supported.')", "load", True),
    ("RuntimeError('unused')", "arguments", True),
])
def test_the_worker_says_why_it_ended_and_only_a_known_permanent_reason_is_permanent(tmp_path, error, where,
                                                                                    permanent):
    worker = StandInWorker(WorkerSpec("m", "/m"), run_dir=tmp_path / "run", log_dir=tmp_path / "logs")
    worker.error, worker.where = error, where
    worker.spawn()
    with pytest.raises(WorkerStartError) as caught:
        asyncio.run(worker.wait_ready(60))
    assert caught.value.permanent is permanent, (str(caught.value), caught.value.log_tail)
    assert worker.returncode == (PERMANENT_EXIT if permanent else TEMPORARY_EXIT)
    if where == "load":
        assert error.split("(")[0] in str(caught.value)
    assert "Error:" in caught.value.log_tail or "Error" in caught.value.log_tail


def test_a_worker_killed_without_a_word_backs_off():
    """A worker the kernel kills (the OOM killer: SIGKILL) says nothing: a temporary failure."""
    assert parse_failure("serving") is None
    assert parse_failure(failure_word(True, "multi\nline   reason")) == (True, "multi line reason")
    assert parse_failure(failure_word(False, "x" * 2000))[1] == "x" * 500
    assert not classify(MemoryError()) and not classify(RuntimeError("Error: No such file or directory"))
    assert classify(FileNotFoundError()) and classify(type("SafetensorError", (Exception,), {})())
