"""The ``kquant`` command's subcommands, one module each; ``kquant.operator.cli`` wires them up.

Each module keeps its pure part (reading a manifest, planning, editing text, rendering a table)
apart from its I/O (the cluster, the files, the console), so tests call the pure part directly
and run the command itself through typer's ``CliRunner``.
"""
