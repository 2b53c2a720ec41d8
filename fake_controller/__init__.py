"""A controller that does what the seed's sample controller does, for tests, demos and benchmarks."""

from fake_controller.controller import FakeController, Settings

__all__ = ["FakeController", "Settings"]
