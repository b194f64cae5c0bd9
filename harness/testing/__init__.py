"""What the pytest plugin (harness.pytest_plugin) offers besides its hooks: fixtures for tests."""
