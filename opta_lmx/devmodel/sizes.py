"""Hyperparameters, file names and the chat template of the generated models."""

from __future__ import annotations

from typing import Any

#: Hyperparameters per size. ``vocab_size`` is the BPE training target; the corpus is rich
#: enough that training always reaches it exactly, and config.json records the trained size.
SIZES: dict[str, dict[str, Any]] = {
    # ~1.1 MB: 1024 x 64 embeddings and lm_head + 2 small layers. Untied on purpose: with tied
    # random embeddings the residual stream makes greedy decoding repeat the last prompt token.
    "tiny": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # ~107 MB in float32 (26.7 M parameters).
    "small": {
        "vocab_size": 4096,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
    # ~1.05 GB in float32 (263 M parameters), written as 3 shards.
    "medium": {
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 22,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}

DTYPES = ("float32", "float16")
MARKER_FILE = "opta_lmx_model.json"
#: Bump when the generator's output changes, so existing models are regenerated.
FORMAT_VERSION = 1
#: Weights larger than this are sharded (Hugging Face style index + numbered files).
MAX_SHARD_BYTES = 500 * 1000 * 1000
INIT_STD = 0.02
#: Standard deviation of the output logits, reached through the final norm's weight (the random
#: matrices keep std INIT_STD). Trained models have peaked next-token distributions; ~3 makes
#: sampling prefer the top tokens, so zeroed lm_head rows (logit 0) are almost never sampled.
LOGIT_STD = 3.0

BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, EOS_TOKEN]  # ids 0, 1, 2

# ChatML. Tools, when passed, are listed in a system turn (Qwen/Hermes style) and assistant tool
# calls are rendered as <tool_call> JSON, so the prompt is meaningful; the random model will not
# actually call them. Content may be a string, None, or a list of OpenAI content parts.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part.type is defined and part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{{- render_content(messages[0].content) + '\\n\\n' -}}"
    "{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}'
    "\\n</tool_call><|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] if (messages and messages[0].role == 'system') "
    "else messages -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + render_content(message.content)"
    " + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) -}}"
    "{%- if message.role == 'assistant' and message.tool_calls is defined"
    " and message.tool_calls -%}"
    "{%- for call in message.tool_calls -%}"
    "{%- set fn = call.function if call.function is defined else call -%}"
    "{%- set args = fn.arguments if fn.arguments is defined else {} -%}"
    "{{- '\\n<tool_call>\\n{\"name\": ' + (fn.name | tojson) + ', \"arguments\": '"
    " + (args if args is string else (args | tojson)) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
