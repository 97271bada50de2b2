"""The shipped run configs (TOML), installed as package data of ``fnclass.configs``."""
