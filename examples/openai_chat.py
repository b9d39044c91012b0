"""Call Opta-LMX with the OpenAI SDK: one answer, then the same question streamed.

    LMX_BASE_URL=http://127.0.0.1:1234/v1 LMX_MODEL=default python examples/openai_chat.py
"""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("LMX_BASE_URL", "http://127.0.0.1:1234/v1"),
                api_key=os.environ.get("LMX_API_KEY", "not-needed-on-loopback"))
model = os.environ.get("LMX_MODEL", "default")

print("models:", [m.id for m in client.models.list().data])
answer = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello in five words."}], max_tokens=16
)
print("answer:", answer.choices[0].message.content)
print("stream: ", end="")
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True
):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
