"""FastAPI: the OpenAI/Anthropic gateway and the admin API. Imports all layers below."""
