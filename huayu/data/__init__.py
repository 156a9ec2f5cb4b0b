"""Data: reading every supported format into one record shape, and turning records into batches."""
