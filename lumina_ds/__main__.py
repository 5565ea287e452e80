from lumina_ds.cli import entry

entry()
