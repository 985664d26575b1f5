"""claude-proxy: a byte-exact streaming proxy for Claude and OpenAI clients.

It sits in front of Microsoft AI Foundry (or api.anthropic.com / api.openai.com) and swaps the
client's proxy key for the upstream credential: an API key or an Entra ID token.
"""

__version__ = "0.1.0"
