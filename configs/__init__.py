"""Run configs: base.py documents every field; one file per task x language."""
