"""CLI sub-commands, one module per area; each module has ``register(subparsers)`` and sets ``handler``."""
