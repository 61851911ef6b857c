"""One module per pipeline stage: plain typed functions plus Prefect task wrappers."""
