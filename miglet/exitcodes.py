"""The exit codes of `miglet run`, which a service manager or an image's boot script acts on."""

from typing import Final

OK: Final = 0
"""A clean stop: the runner is stopped and every event owed was delivered."""
FAILURE: Final = 1
"""An unrecoverable failure: a deadline given up on, repeated internal errors."""
CONFIG: Final = 2
"""A configuration error, found before any network call."""
UNDELIVERED: Final = 3
"""An otherwise clean stop that could not deliver every lifecycle event it owed the controller."""
