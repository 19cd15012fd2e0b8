"""The shipped DeepSpeed configs (JSON), installed as package data ``llave_ds.ds_configs``."""
