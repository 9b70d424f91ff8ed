pytest_plugins = ["tests.fixtures_chain"]
