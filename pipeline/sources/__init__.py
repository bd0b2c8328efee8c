"""What to read: corpora (`corpus`) and models (`model_source`), named by spec or fsspec URL."""
