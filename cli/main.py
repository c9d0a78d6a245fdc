"""Entry point of the ``cavmae`` console script."""

from __future__ import annotations

import click

from cavmae import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cavmae")
def cli() -> None:
    """CAV-MAE audio-visual models: export, classify, embed, reconstruct, benchmark."""


def main() -> None:
    cli()
