"""`validate-data`: every record checked and reported with its number, code and kind; duplicates and statistics."""
