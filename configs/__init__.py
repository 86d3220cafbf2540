"""Run configs, data only: each file imports stt_jax.run_config (where every field and its
default is documented) and sets a few fields; one file per task x language, plus tiny and demo."""
