"""shoal: turn the machines you have into one LLM inference cluster."""

__version__ = "0.1.0"
