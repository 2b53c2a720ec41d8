# MIGlet's everyday commands. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"

# List the recipes
default:
    @just --list

# Create .venv and install MIGlet with its development tools
setup:
    python3 -m venv {{venv}}
    {{bin}}/pip install -q -e '.[dev]'

# Run the demo: fake controller + MIGlet + fake runner, through registration, a job and shutdown
demo:
    {{bin}}/python -m fake_controller.demo

# Lint, type-check and run the whole test suite
test: lint
    {{bin}}/python -m pytest -q

# ruff (lint and format) and mypy --strict
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy

# Serve the fake controller (see --help for its options)
fake-controller *ARGS:
    {{bin}}/python -m fake_controller {{ARGS}}
