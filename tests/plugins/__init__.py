"""An analysis added the way the README's "Add an analysis" section says: ``entropy.py`` + ``entropy_render.py``."""
