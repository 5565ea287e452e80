"""Reading data: files (plain, gzip), record formats, tables (JSON, Parquet, Arrow), sources and their specs, and the
checks every line or row goes through."""
