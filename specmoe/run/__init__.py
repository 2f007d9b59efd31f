"""``specmoe run``: the whole pipeline in one resumable run directory."""
