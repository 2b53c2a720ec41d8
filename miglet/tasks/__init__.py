"""The agent's long-running tasks; `miglet.app` supervises them in one nursery (docs/design.md)."""
