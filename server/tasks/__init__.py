"""Tasks: the contract every task follows, the registry that finds them, the built-ins and
the Hugging Face adapter. See :mod:`server.tasks.contract`."""
