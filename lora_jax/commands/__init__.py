"""One module per `lora-jax` subcommand: `HELP`, `add_arguments(parser)`, `run(args) -> int`."""
