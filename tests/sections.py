"""Config sections as library functions read them: every field at its default (`ldm_jax/config.py`,
the one source of defaults), some set."""
from ldm_jax.config import default_config


def section(section_name, **fields):
    """`default_config().<section_name>` with `fields` set."""
    config = default_config()[section_name]
    config.update(fields)
    return config
