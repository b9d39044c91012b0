"""Generate small but genuine LLM directories for tests, CI and benchmarks.

No model hub is reachable where the project's tests run, so the project makes its own models:
a llama-architecture ``config.json``, a byte-level BPE tokenizer trained on a small built-in
English corpus (with a ChatML chat template), and randomly initialised weights in safetensors
files named as Hugging Face llama checkpoints. ``mlx_lm.load`` and the vllm-mlx server accept
the result like any downloaded model; what it generates is, of course, noise.

Everything is deterministic: the same ``size``, ``seed`` and ``dtype`` give byte-identical files.
A model is written into a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves something that looks like a complete model. A small marker file,
``opta_lmx_model.json``, records the parameters; asking again for a model that is already
complete returns at once.

    >>> from opta_lmx.devmodel import make_model
    >>> path = make_model("/tmp/tinymodel", size="tiny")   # about 1 MB, well under a second

or ``lmx dev make-model /tmp/tinymodel --size tiny``.

Two deliberate departures from a plain random init make the output friendlier to tests:
lm_head rows of raw-byte tokens that are not printable ASCII (and of the non-EOS special tokens)
are zero, so the text is always readable ASCII; and the final norm's weight scales the logits to
a standard deviation of about 3, so sampling prefers the top tokens like a trained model does.
The EOS row is random, so some prompts end with ``finish_reason: "stop"`` (greedy "hi" on tiny,
seed 0, stops after 12 tokens on MLX's CPU backend) and others run to ``max_tokens``.

Sizes (float32, Linux x86 CPU, 2 cores): tiny 1.08 MB in ~0.5 s; small 107 MB in ~1.3 s;
medium 1.06 GB (3 shards) in ~7 s with a peak RSS of ~550 MB (one shard in memory at a time).

Only the command line (and tests, benchmarks) may import this package: an import-linter
contract keeps it out of the server's layers.
"""

from __future__ import annotations

from opta_lmx.devmodel.make import is_complete, make_model, model_files
from opta_lmx.devmodel.sizes import DTYPES, MARKER_FILE, SIZES
from opta_lmx.devmodel.weights import tensor_plan

__all__ = ["SIZES", "DTYPES", "MARKER_FILE", "make_model", "is_complete", "model_files", "tensor_plan"]
