"""The shipped training configs (YAML), installed as package data ``llave_ds.configs``."""
