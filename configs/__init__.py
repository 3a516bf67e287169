"""The launchable configs (``--config configs/<name>.py``), installed as ``softnce.configs``."""
