"""The built-in pipeline configs (`tiny`, `longvila-r1`): YAML files shipped as package data, so
`load_config("longvila-r1")` finds them in an installed wheel as in a checkout (`tasks/config.py`)."""
