"""Test support that the tests and bench/ import: stack runner, chaos, poison, load."""
