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

# The demo, with the cloud taking the VM back while the job runs (aws, gcp or azure)
demo-preempt provider="aws":
    {{bin}}/python -m fake_controller.demo --preempt {{provider}}

# Lint, type-check and run the whole test suite
test: lint
    {{bin}}/python -m pytest -q

# ruff (lint and format), mypy --strict and hadolint
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy
    {{bin}}/hadolint Dockerfile

# Regenerate docs/openapi.json from the wire types in miglet/protocol.py
openapi:
    {{bin}}/python -m miglet.openapi > docs/openapi.json.tmp && mv docs/openapi.json.tmp docs/openapi.json

# Pin MIGlet's runtime dependencies, with their hashes, in requirements.lock (after changing pyproject.toml)
lock:
    {{bin}}/pip-compile --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links --output-file requirements.lock pyproject.toml

# Build into dist/: the wheel, the source distribution, the lock, the standalone build and its Debian package
dist:
    rm -rf dist build/bundle-venv
    {{bin}}/python -m build --outdir dist . >/dev/null
    cp requirements.lock dist/
    # The standalone build is made from exactly the locked runtime set, plus PyInstaller to build it.
    python3 -m venv build/bundle-venv
    build/bundle-venv/bin/pip install -q --require-hashes -r requirements.lock
    build/bundle-venv/bin/pip install -q --no-deps dist/miglet-*.whl
    build/bundle-venv/bin/pip install -q 'pyinstaller>=6.10,<7'
    build/bundle-venv/bin/python packaging/bundle/build.py bundle dist
    {{bin}}/python packaging/bundle/build.py deb dist
    @ls -1 dist

# Build the container image (MIGlet only; add the runner in your own layer, see docs/operations.md)
docker-build tag="miglet":
    docker build -t {{tag}} .

# Run the benchmarks: prints a table, writes benchmarks/results.json and docs/benchmarks.md (a few minutes)
bench *NAMES:
    {{bin}}/python -m compileall -q miglet fake_controller benchmarks
    {{bin}}/python -m benchmarks {{NAMES}}

# Serve the fake controller (see --help for its options)
fake-controller *ARGS:
    {{bin}}/python -m fake_controller {{ARGS}}
