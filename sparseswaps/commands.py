"""Subcommands beyond `solvers`; each registrar adds one argparse sub-parser."""

REGISTRARS: list = []
