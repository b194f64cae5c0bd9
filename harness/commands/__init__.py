"""One module per `powercut` subcommand (see harness/cli.py for the contract)."""
