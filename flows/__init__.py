"""Thin Prefect flows over the stages in `tasks/`, and the `t2i` command line."""
