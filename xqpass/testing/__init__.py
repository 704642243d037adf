"""Testing helpers for users' own property tests: ``xqpass.testing.strategies`` (needs hypothesis)."""
