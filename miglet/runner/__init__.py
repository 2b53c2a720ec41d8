"""Driving GitHub's actions/runner: what a registration is, how its output reads, how its processes run."""
