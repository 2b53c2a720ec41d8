"""A fake GitHub Actions runner (actions/runner) for testing MIGlet without GitHub.

`install(DIR)` lays out `config.sh`, `run.sh`, `run-helper.sh.template`, ... with the real scripts'
contract; only `bin/Runner.Listener` is fake (Python, steered by `DIR/fake-runner.json`), so the real
runner can be dropped into its place. `behaviour.Behaviour` lists what tests can tune; each module's
docstring says which part of the real runner it mirrors.
"""

from .behaviour import Behaviour, Job
from .install import enqueue_job, install, read_calls, read_left_behind, write_behaviour
from .leftovers import hopping, stop_hopping
from .store import encode_jitconfig

__all__ = [
    "Behaviour",
    "Job",
    "encode_jitconfig",
    "enqueue_job",
    "hopping",
    "install",
    "read_calls",
    "read_left_behind",
    "stop_hopping",
    "write_behaviour",
]
