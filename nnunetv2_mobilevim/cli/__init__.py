"""The ``nnunetv2_mobilevim`` command (``main``) and its sub-commands, one module each."""
