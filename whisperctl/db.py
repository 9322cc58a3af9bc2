"""``whisperctl db``: database schema management."""

from __future__ import annotations

import typer

from whisperctl.options import DataDir, Verbose, build_settings, open_data_dir

app = typer.Typer(help="Manage the database schema.", no_args_is_help=True)


@app.command()
def upgrade(data_dir: DataDir = None, verbose: Verbose = False) -> None:
    """Apply all migrations (safe to run repeatedly)."""
    from transcription.db.migrate import current_revision
    from transcription.db.migrate import upgrade as run_upgrade
    from transcription.db.session import Database
    from transcription.settings import CoreSettings

    settings = build_settings(CoreSettings, data_dir)
    open_data_dir(settings, verbose=verbose)
    database = Database(settings.resolved_database_url())
    run_upgrade(database.engine)
    typer.echo(f"database at revision {current_revision(database.engine)}")
    database.dispose()
