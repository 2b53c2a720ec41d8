"""MIGlet: the agent inside each ephemeral CI VM that brings up a GitHub Actions runner for its controller."""

__version__ = "0.1.0"
